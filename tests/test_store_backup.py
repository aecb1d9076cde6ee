"""Backup of a store holding a slide counted by the real pipeline: the backup opens as a store
with the same report and byte-identical crops, a write in progress is not in it, a second run
copies nothing new, purged images leave it, lost files are named, and bad folders are refused."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import select, update
from typer.testing import CliRunner

from daemon.backup import DATA_NAME, DB_NAME, MANIFEST, PREVIOUS_NAME, backup_store
from daemon.cli import app
from daemon.models import Cell, Field, Slide
from daemon.report import build_report
from daemon.retention import purge_field_images
from daemon.review import actions
from daemon.store import Store
from tests.review_slide import (  # noqa: F401  (fixtures)
    TECH,
    pipeline_fields,
    review_env,
    review_template,
)


def _named(store: Store) -> list[str]:
    with store.session() as s:
        return ([p for p in s.scalars(select(Field.image_path)) if p]
                + [p for p in s.scalars(select(Cell.crop_path)) if p])


def test_backup_restores_as_the_same_store(review_env, tmp_path):
    env = review_env
    with env.store.session() as s:
        first = s.scalars(select(Cell.id).where(Cell.slide_id == env.slide_id)).first()
        actions.reclassify(s, env.slide_id, [first], "monocyte",
                           actions.Reviewer(TECH[0], "technician"), {env.cfg.taxonomy: env.cfg.classes})
        actions.sign(s, env.slide_id, actions.Reviewer(TECH[0], "technician"), "backed up")
    before = build_report(env.store, env.slide_id, env.cfg)

    res = backup_store(env.store, tmp_path / "bk")
    named = _named(env.store)
    assert res.missing == [] and res.files == len(set(named)) > 40
    assert res.copied == res.files and res.unchanged == 0 and res.slides == 1
    for rel in named:
        assert filecmp.cmp(env.store.path(rel), tmp_path / "bk" / DATA_NAME / rel, shallow=False)
    manifest = json.loads((tmp_path / "bk" / MANIFEST).read_text())
    assert manifest["files"] == res.files and manifest["missing"] == []

    restored = Store(f"sqlite:///{tmp_path / 'bk' / DB_NAME}", tmp_path / "bk" / DATA_NAME,
                     existing=True)
    try:
        after = build_report(restored, env.slide_id, env.cfg)
        assert after["differential"] == before["differential"]
        assert after["review"] == before["review"]
        with restored.session() as s:
            assert s.get(Slide, env.slide_id).status == "signed"
    finally:
        restored.close()


def test_a_damaged_store_does_not_reach_the_only_backup(review_env, tmp_path):
    """A store damaged in a way nobody noticed at once (here every cell's class overwritten,
    as a faulty upgrade or a wrong manual edit would) had replaced the one good backup the
    next night. The databases of the backups before are kept, the newest ``keep``."""
    env = review_env
    bk = tmp_path / "bk"
    before = build_report(env.store, env.slide_id, env.cfg)
    assert backup_store(env.store, bk, keep=2).previous == []
    with env.store.session() as s:
        s.execute(update(Cell).where(Cell.slide_id == env.slide_id).values(label="monocyte"))
    time.sleep(1.1)  # a database kept is named by the second its backup was taken
    night = backup_store(env.store, bk, keep=2)
    (good,) = night.previous

    def differential_in(db: Path) -> dict:
        copy = tmp_path / "restored.db"  # a copy is opened: the backup itself stays as it is
        copy.write_bytes(db.read_bytes())
        restored = Store(f"sqlite:///{copy}", bk / DATA_NAME, existing=True)
        try:
            return build_report(restored, env.slide_id, env.cfg)["differential"]
        finally:
            restored.close()

    assert differential_in(bk / DB_NAME) != before["differential"]  # the damage is backed up
    assert differential_in(bk / PREVIOUS_NAME / good) == before["differential"]
    nights = []
    for _ in range(2):
        time.sleep(1.1)
        nights.append(backup_store(env.store, bk, keep=2))
    assert [len(n.previous) for n in nights] == [2, 2] and good not in nights[-1].previous
    assert nights[-1].previous == sorted(p.name for p in (bk / PREVIOUS_NAME).iterdir())
    res = CliRunner().invoke(app, ["backup", str(bk), "--keep-databases", "0", "--db", env.url,
                                   "--data-dir", str(env.root / "data")])
    assert res.exit_code == 0 and "0 earlier database(s)" in res.output, res.output
    assert list((bk / PREVIOUS_NAME).iterdir()) == []


def test_backup_is_incremental_and_follows_purges(review_env, tmp_path):
    env = review_env
    first = backup_store(env.store, tmp_path / "bk")
    again = backup_store(env.store, tmp_path / "bk")
    assert (again.copied, again.unchanged, again.removed) == (0, first.files, 0)

    with env.store.session() as s:
        actions.sign(s, env.slide_id, actions.Reviewer(TECH[0], "technician"), None)
    purged = purge_field_images(env.store, datetime.now(timezone.utc) + timedelta(minutes=1),
                                "ops")
    third = backup_store(env.store, tmp_path / "bk")
    assert third.removed == purged[0].fields == 40
    assert third.files == first.files - 40 and third.copied == 0
    kept = {p.relative_to(tmp_path / "bk" / DATA_NAME).as_posix()
            for p in (tmp_path / "bk" / DATA_NAME).rglob("*") if p.is_file()}
    assert kept == set(_named(env.store))


def _commit_with_backup_at(env, pipeline_fields, tmp_path, monkeypatch, where: str):
    """Commit one more field to the slide, taking a backup at ``where`` in the commit:
    ``in_transaction`` (its rows written, not committed) or ``before_rename`` (committed,
    its files still in the staging folder). Returns the backup and the slide's field count
    before and its cell count before."""
    import daemon.store as store_mod

    n_fields = len(env.store.fields(env.slide_id))
    n_cells = len(env.store.cells(env.slide_id))
    env.store.set_status(env.slide_id, "queued")
    env.store.set_status(env.slide_id, "acquiring")
    taken = []
    if where == "in_transaction":
        real = store_mod._cell_row

        def hook(*args, **kwargs):
            if not taken:
                taken.append(backup_store(env.store, tmp_path / "bk"))
            return real(*args, **kwargs)

        monkeypatch.setattr(store_mod, "_cell_row", hook)
    else:
        real = store_mod.Store._insert_field

        def hook(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            taken.append(backup_store(env.store, tmp_path / "bk"))
            return out

        monkeypatch.setattr(store_mod.Store, "_insert_field", hook)
    fld = next(f for f in pipeline_fields if f.cells)
    assert env.store.commit_field(env.slide_id, dataclasses.replace(fld, index=n_fields))
    monkeypatch.undo()
    assert len(taken) == 1 and len(env.store.fields(env.slide_id)) == n_fields + 1
    return taken[0], n_fields, n_cells


def _restored_fields(tmp_path, slide_id):
    restored = Store(f"sqlite:///{tmp_path / 'bk' / DB_NAME}", tmp_path / "bk" / DATA_NAME,
                     existing=True)
    try:
        return [(f.index, f.image_path) for f in restored.fields(slide_id)], restored.cells(
            slide_id)
    finally:
        restored.close()


def test_a_field_in_its_transaction_is_not_in_the_backup(review_env, pipeline_fields,
                                                         tmp_path, monkeypatch):
    res, n_fields, n_cells = _commit_with_backup_at(review_env, pipeline_fields, tmp_path,
                                                    monkeypatch, "in_transaction")
    fields, cells = _restored_fields(tmp_path, review_env.slide_id)
    assert res.missing == [] and [i for i, _ in fields] == list(range(n_fields))
    assert len(cells) == n_cells < len(review_env.store.cells(review_env.slide_id))


def test_a_field_committed_but_not_yet_moved_into_place_is_backed_up_whole(
        review_env, pipeline_fields, tmp_path, monkeypatch):
    res, n_fields, _ = _commit_with_backup_at(review_env, pipeline_fields, tmp_path,
                                              monkeypatch, "before_rename")
    fields, cells = _restored_fields(tmp_path, review_env.slide_id)
    assert res.missing == [] and len(fields) == n_fields + 1
    newest = [c.crop_path for c in cells if c.crop_path and f"/f{n_fields:05d}/" in c.crop_path]
    assert newest and fields[-1][1]
    for rel in [*newest, fields[-1][1]]:  # copied from the staging folder, byte for byte
        assert filecmp.cmp(review_env.store.path(rel), tmp_path / "bk" / DATA_NAME / rel,
                           shallow=False)


def test_backup_command_names_lost_files_and_refuses_bad_folders(review_env, tmp_path):
    env = review_env
    args = ["--db", env.url, "--data-dir", str(env.root / "data")]
    lost = _named(env.store)[0]
    env.store.path(lost).unlink()
    runner = CliRunner()
    res = runner.invoke(app, ["backup", str(tmp_path / "bk"), *args])
    assert res.exit_code == 1
    assert "1 file(s) the store names are missing" in res.output and lost in res.output
    assert (tmp_path / "bk" / DB_NAME).is_file()  # everything else is backed up

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("a lab's own files")
    for dest, why in [(tmp_path / "other", "holds files that are not a marrowcount backup"),
                      (env.root / "data" / "bk", "inside the store itself"),
                      (env.root, "inside the store itself")]:
        res = runner.invoke(app, ["backup", str(dest), *args])
        assert res.exit_code != 0 and why in str(res.exception), (dest, res.output)
    assert (tmp_path / "other" / "notes.txt").read_text() == "a lab's own files"

    # A backup disk freshly made and mounted there holds lost+found: still an empty folder.
    (tmp_path / "disk" / "lost+found").mkdir(parents=True)
    res = runner.invoke(app, ["backup", str(tmp_path / "disk"), *args])
    assert res.exit_code == 1 and (tmp_path / "disk" / DB_NAME).is_file(), res.output

    res = runner.invoke(app, ["backup", str(tmp_path / "bk2"), "--db",
                              f"sqlite:///{tmp_path / 'nowhere.db'}"])
    assert res.exit_code != 0 and "no store at" in str(res.exception)


def test_a_first_backup_killed_part_way_is_finished_by_the_next(review_env, tmp_path,
                                                                 monkeypatch):
    import shutil as sh

    import daemon.backup as backup_mod

    env = review_env
    real, calls = sh.copy2, []

    def copy_then_die(src, dst):
        calls.append(src)
        if len(calls) == 6:
            raise KeyboardInterrupt  # killed at the sixth file
        return real(src, dst)

    monkeypatch.setattr(backup_mod.shutil, "copy2", copy_then_die)
    try:
        backup_store(env.store, tmp_path / "bk")
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert not (tmp_path / "bk" / DB_NAME).exists()  # no database naming missing files
    res = backup_store(env.store, tmp_path / "bk")
    assert res.missing == [] and res.unchanged == 5 and res.copied == res.files - 5


def test_an_image_purged_after_the_snapshot_is_not_called_lost(review_env, tmp_path,
                                                               monkeypatch):
    """purge-images runs between the snapshot and the copy (both timers fire at boot): the
    backup's database stops naming the purged images; nothing is reported lost."""
    import daemon.backup as backup_mod

    env = review_env
    with env.store.session() as s:
        actions.sign(s, env.slide_id, actions.Reviewer(TECH[0], "technician"), None)
    real = backup_mod._snapshot

    def snapshot_then_purge(src, out):
        real(src, out)
        purge_field_images(env.store, datetime.now(timezone.utc) + timedelta(minutes=1), "ops")

    monkeypatch.setattr(backup_mod, "_snapshot", snapshot_then_purge)
    res = backup_store(env.store, tmp_path / "bk")
    assert res.missing == [] and res.files == len(_named(env.store))
    restored = Store(f"sqlite:///{tmp_path / 'bk' / DB_NAME}", tmp_path / "bk" / DATA_NAME,
                     existing=True)
    try:
        assert all(f.image_path is None for f in restored.fields(env.slide_id))
    finally:
        restored.close()


def test_the_lis_export_start_travels_with_the_backup(review_env, tmp_path):
    """When exporting to the LIS began is kept in the data folder: a restored store without
    it exported only from a day before its first run, and an older sign-off the LIS never got
    was never sent."""
    from daemon.report_export import SINCE_FILE

    env = review_env
    (env.store.data_dir / SINCE_FILE).write_text("2026-11-01T00:00:00+00:00\n")
    res = backup_store(env.store, tmp_path / "bk")
    copy = tmp_path / "bk" / DATA_NAME / SINCE_FILE
    assert copy.read_text() == "2026-11-01T00:00:00+00:00\n" and res.missing == []
    assert backup_store(env.store, tmp_path / "bk").removed == 0 and copy.is_file()


def test_a_full_backup_disk_is_a_message_and_leaves_no_partial_files(review_env, tmp_path,
                                                                      monkeypatch):
    import errno
    import shutil

    import pytest

    import daemon.backup as backup
    from daemon.store import StoreError

    calls = []

    def filling(src, dst, *a, **k):
        calls.append(dst)
        if len(calls) > 5:  # the disk fills part way through a file
            with open(dst, "wb") as fh:
                fh.write(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return shutil.copy2(src, dst, *a, **k)

    monkeypatch.setattr(backup.shutil, "copy2", filling)
    with pytest.raises(StoreError, match=r"backup to .* failed: No space left on device "
                                         r"\(.*\.partial\); the backup there before this run "
                                         r"is unchanged"):
        backup_store(review_env.store, tmp_path / "bk")
    assert not list((tmp_path / "bk").rglob("*.partial"))
    assert not (tmp_path / "bk" / DB_NAME).exists()  # no database naming what is not there
