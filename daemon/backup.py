"""Backup: a consistent copy of a SQLite store and every image it names, safe while it runs.

A lab must be able to restore its counts, reviews and audit trail after a disk fails. Copying
the database file while the daemon writes can catch it half-written; ``backup_store`` takes a
snapshot through SQLite's online-backup API instead (one read transaction: the last committed
state, never a field half-committed), then copies exactly the field images and crops that the
snapshot names. The files are written once and never changed, so a file already in the backup
with the same size and modification time is kept (a nightly backup copies only new slides).

The backup folder is itself a store: ``DEST/marrowcount.db`` and ``DEST/data/``. Its database
is replaced only after every file it names is in place, and files no longer named (purged
field images, a previous backup's leftovers) are deleted only after that; a backup killed part
way leaves the previous one whole. PostgreSQL stores are backed up with ``pg_dump``.

The databases of the last backups before it are kept too, in ``DEST/previous/`` (``keep`` of
them; a database is small beside the images): a store damaged in a way nobody noticed at once
(a faulty upgrade, a wrong manual edit) would otherwise reach the only backup the next night.
Restored, an earlier database has its counts, reviews, crops and audit trail; field images
purged since it was taken are no longer in the backup.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import create_engine, select, update
from sqlalchemy.engine import make_url

from daemon.models import Cell, Field
from daemon.report_export import SINCE_FILE
from daemon.store import Store, StoreError

DB_NAME = "marrowcount.db"
DATA_NAME = "data"
MANIFEST = "BACKUP.json"
PREVIOUS_NAME = "previous"
KEEP_DATABASES = 7
"""Earlier backups' databases kept in ``DEST/previous/`` by default: a week of nightly ones."""
# Files not found at the first pass are looked for once more after this wait: a field whose
# staging folder was being renamed into place is then in place.
RENAME_WAIT_S = 1.0
# Files are written once and never changed: the same size and time (to a FAT disk's 2 s) is
# the same file.
MTIME_SLACK_S = 2.0


@dataclass(frozen=True)
class BackupResult:
    """What one backup wrote; ``missing`` lists files the snapshot names that the store lacks."""

    dest: str
    taken_at: str
    slides: int
    files: int
    copied: int
    unchanged: int
    removed: int
    bytes_copied: int
    missing: list[str] = field(default_factory=list)
    previous: list[str] = field(default_factory=list)
    """Earlier backups' databases in ``dest/previous/``, oldest first."""


def backup_store(store: Store, dest: str | Path, keep: int = KEEP_DATABASES) -> BackupResult:
    """Back up ``store`` (SQLite) into the folder ``dest``; see the module docstring.
    ``keep``: how many earlier backups' databases stay in ``dest/previous/`` (0: none).

    Raises StoreError for a PostgreSQL store, a ``dest`` inside the store's data directory or
    holding the store itself, a non-empty ``dest`` that is not a marrowcount backup, or a
    snapshot that fails SQLite's integrity check. Files the snapshot names but the store has
    lost are listed in ``missing`` (the rest is still backed up).
    """
    dest = Path(dest).resolve()
    src_db = _sqlite_path(store.url)
    data = store.data_dir.resolve()
    if dest == data or data in dest.parents or src_db in (dest / DB_NAME, dest) or (
            dest / DATA_NAME == data):
        raise StoreError(f"backup folder {dest} would overwrite or lie inside the store itself")
    # Anything else in the folder is someone else's: refused. A first backup killed part way
    # leaves only these names, and the next run finishes it.
    # lost+found: the root of a freshly made ext4 file system, mounted there for backups.
    ours = {DB_NAME, DATA_NAME, MANIFEST, PREVIOUS_NAME, f".{DB_NAME}.partial",
            MANIFEST + ".partial", "lost+found"}
    if dest.is_dir() and {p.name for p in dest.iterdir()} - ours:
        raise StoreError(f"{dest} holds files that are not a marrowcount backup "
                         f"({MANIFEST}); give an empty or new folder")
    if keep < 0:
        raise StoreError(f"keep must be 0 or more databases, not {keep}")
    try:
        return _backup(store, dest, src_db, data, keep)
    except OSError as exc:
        # A full or read-only backup disk: a message, not a traceback, and no half-written
        # files left to keep the disk full (the backup there before is whole: its database
        # is only ever replaced after every file it names).
        for leftover in [dest / f".{DB_NAME}.partial", dest / (MANIFEST + ".partial"),
                         *(dest / DATA_NAME).rglob("*.partial")]:
            with contextlib.suppress(OSError):
                leftover.unlink()
        raise StoreError(f"backup to {dest} failed: {exc.strerror or exc}"
                         + (f" ({exc.filename})" if exc.filename else "")
                         + "; the backup there before this run is unchanged") from None


def _backup(store: Store, dest: Path, src_db: Path, data: Path, keep: int) -> BackupResult:
    """The copying part of ``backup_store``, its checks done."""
    (dest / DATA_NAME).mkdir(parents=True, exist_ok=True)

    taken_at = datetime.now(timezone.utc)
    tmp_db = dest / f".{DB_NAME}.partial"
    tmp_db.unlink(missing_ok=True)
    _snapshot(src_db, tmp_db)
    images, crops, slides = _named_files(tmp_db)
    names = images | crops
    # When exporting to the LIS began: a restored store without it would export only from a
    # day before its first run, and a sign-off the LIS never got before would never be sent.
    if (store.data_dir / SINCE_FILE).is_file():
        names.add(SINCE_FILE)

    done: list[int | None] = []  # per file: bytes copied, or None when already current
    late = []
    for rel in sorted(names):
        try:
            done.append(_copy(store, rel, dest / DATA_NAME / rel))
        except FileNotFoundError:  # lost, or being moved from staging into place right now
            late.append(rel)
    if late:
        time.sleep(RENAME_WAIT_S)
    missing = []
    for rel in late:
        try:
            done.append(_copy(store, rel, dest / DATA_NAME / rel))
        except FileNotFoundError:
            missing.append(rel)
    # A field image purged (purge-images) since the snapshot is not lost: the backup's
    # database stops naming it too, as the store's does now.
    purged = _no_longer_named(store, [rel for rel in missing if rel in images])
    if purged:
        _forget_images(tmp_db, purged)
        names -= purged
        missing = [rel for rel in missing if rel not in purged]
    copied = [n for n in done if n is not None]

    os.sync()  # the copies reach the disk before the database that names them
    previous = _keep_previous(dest, keep)
    os.replace(tmp_db, dest / DB_NAME)
    removed = _remove_unnamed(dest / DATA_NAME, names)
    result = BackupResult(str(dest), taken_at.isoformat(timespec="seconds"), slides,
                          len(names), len(copied), len(done) - len(copied), removed,
                          sum(copied), missing, previous)
    manifest = {"source": str(src_db), "data_dir": str(data), **asdict(result)}
    part = dest / (MANIFEST + ".partial")
    part.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(part, dest / MANIFEST)
    return result


def _keep_previous(dest: Path, keep: int) -> list[str]:
    """Keep the database about to be replaced as ``previous/marrowcount-<its time>.db``, and
    the newest ``keep`` of those; returns their names, oldest first. A hard link: nothing is
    copied, and the backup's own database is never missing, even for a moment."""
    folder = dest / PREVIOUS_NAME
    current = dest / DB_NAME
    if keep and current.is_file():
        folder.mkdir(exist_ok=True)
        try:
            stamp = json.loads((dest / MANIFEST).read_text())["taken_at"]
        except (OSError, ValueError, KeyError, TypeError):  # a first backup killed part way
            stamp = datetime.fromtimestamp(current.stat().st_mtime, timezone.utc).isoformat(
                timespec="seconds")
        kept = folder / f"marrowcount-{stamp.replace(':', '')}.db"
        kept.unlink(missing_ok=True)
        try:
            os.link(current, kept)
        except OSError:  # a file system without hard links (FAT, some network shares)
            shutil.copy2(current, kept)
    if not folder.is_dir():
        return []
    # The names sort by time: ISO 8601 in UTC.
    names = sorted(p.name for p in folder.glob("marrowcount-*.db"))
    for old in names[:max(0, len(names) - keep)]:
        (folder / old).unlink()
    return names[max(0, len(names) - keep):]


def _sqlite_path(url: str) -> Path:
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        raise StoreError("backup copies SQLite stores; back up a PostgreSQL store with pg_dump "
                         "and copy its data directory")
    if not u.database or u.database == ":memory:":
        raise StoreError("an in-memory store has nothing to back up")
    return Path(u.database).resolve()


def _snapshot(src_db: Path, out: Path) -> None:
    """The last committed state of ``src_db``, copied in one read transaction, then checked."""
    try:
        src = sqlite3.connect(f"{src_db.as_uri()}?mode=rw", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot back up {src_db}: {exc}") from None
    dst = sqlite3.connect(out)
    try:
        src.backup(dst)  # all pages in one step: one consistent snapshot, writers not blocked
        ok = dst.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.Error as exc:
        out.unlink(missing_ok=True)
        raise StoreError(f"cannot back up {src_db}: {exc}") from None
    finally:
        dst.close()
        src.close()
    if ok != [("ok",)]:
        out.unlink(missing_ok=True)
        raise StoreError(f"the snapshot of {src_db} fails SQLite's integrity check: "
                         f"{'; '.join(r[0] for r in ok[:3])}")


def _named_files(db: Path) -> tuple[set[str], set[str], int]:
    """The field images and the crops the snapshot names (data-relative), and its slide
    count."""
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            images = set(conn.scalars(select(Field.image_path)
                                      .where(Field.image_path.is_not(None))))
            crops = set(conn.scalars(select(Cell.crop_path).where(Cell.crop_path.is_not(None))))
            slides = conn.exec_driver_sql("SELECT count(*) FROM slides").scalar_one()
    finally:
        engine.dispose()
    return images, crops, slides


def _no_longer_named(store: Store, images: list[str]) -> set[str]:
    """Those of the field ``images`` that the store's live database no longer names."""
    if not images:
        return set()
    with store.session() as s:
        still = set(s.scalars(select(Field.image_path).where(Field.image_path.in_(images))))
    return set(images) - still


def _forget_images(db: Path, rels: set[str]) -> None:
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.begin() as conn:
            conn.execute(update(Field).where(Field.image_path.in_(sorted(rels)))
                         .values(image_path=None))
    finally:
        engine.dispose()


def _copy(store: Store, rel: str, target: Path) -> int | None:
    """Copy the store's file ``rel`` (from wherever ``Store.locations`` finds it) to
    ``target``: bytes copied, or None when ``target`` is already a copy of it (same size and
    time). Raises FileNotFoundError when it is not there."""
    for source in store.locations(rel):
        try:
            st = source.stat()
            try:
                old = target.stat()
                # Network and FAT disks keep times to 100 ns … 2 s, not to the nanosecond.
                if old.st_size == st.st_size and abs(old.st_mtime - st.st_mtime) <= MTIME_SLACK_S:
                    return None
            except FileNotFoundError:
                target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".partial")
            shutil.copy2(source, part)
            os.replace(part, target)
            return st.st_size
        except FileNotFoundError:
            continue
    raise FileNotFoundError(rel)


def _remove_unnamed(root: Path, names: set[str]) -> int:
    removed = 0
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = Path(dirpath) / name
            if path.relative_to(root).as_posix() not in names:
                path.unlink()
                removed += 1
        if dirpath != str(root) and not os.listdir(dirpath):
            os.rmdir(dirpath)
    return removed
