"""The store: migrations, atomic field commits with crops and running counts, idempotence,
rollback on a full disk, refusal of foreign databases. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import errno
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, inspect, select, text

from daemon.models import Cell, Count, Field, Slide
from daemon.store import Store, StoreError, write_file
from tests.conftest import REPO
from tests.daemon_fixtures import expected_counts, make_field, skipped_field, store_url  # noqa: F401


def _files(data: Path) -> set[str]:
    return {str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()}


def _referenced(store: Store, slide_id: int) -> set[str]:
    out = {c.crop_path for c in store.cells(slide_id) if c.crop_path}
    out |= {f.image_path for f in store.fields(slide_id) if f.image_path}
    return out


def test_commit_fields_rows_crops_counts(store_url, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    with Store(store_url, data) as store:
        sid = store.create_slide("S-1", "virtual", "slide.json", 500, "pbc11")
        fields = [make_field(0), make_field(1), skipped_field(2), make_field(3)]
        assert all(store.commit_field(sid, f) for f in fields)

        assert store.counts(sid) == expected_counts(fields)
        prog = store.progress(sid)
        assert prog.last_index == 3 and prog.n_fields == 4
        assert prog.counted == sum(f.n_counted for f in fields)

        rows = store.fields(sid)
        assert [f.index for f in rows] == [0, 1, 2, 3]
        assert rows[2].skipped_reason == "out of focus" and rows[2].image_path is None
        cells = store.cells(sid)
        assert len(cells) == sum(len(f.cells) for f in fields)
        # Every crop on disk is the pipeline's crop, pixel for pixel (PNG is lossless).
        by_key = {(f.index, c.index): c for f in fields for c in f.cells}
        idx = {r.id: r.index for r in rows}
        for c in cells:
            want = by_key[(idx[c.field_id], c.index)]
            got = cv2.imread(str(store.path(c.crop_path)))[:, :, ::-1]
            np.testing.assert_array_equal(got, want.crop)
            assert c.label == want.label and c.duplicate_of == want.duplicate_of
            assert c.probabilities[want.label] == pytest.approx(want.probabilities[want.label])
        # The field image keeps its pixel size.
        img = Image.open(store.path(rows[0].image_path))
        assert img.size == (640, 480)
        assert 25400 / img.info["dpi"][0] == pytest.approx(fields[0].um_per_px, rel=1e-3)
        assert _files(data) == _referenced(store, sid)


def test_repeat_commit_is_a_noop(store_url, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    with Store(store_url, data) as store:
        sid = store.create_slide("S-2", "virtual", "slide.json", 500, "pbc11")
        f0 = make_field(5)
        assert store.commit_field(sid, f0) is True
        before = (store.counts(sid), len(store.cells(sid)), _files(data))
        assert store.commit_field(sid, f0) is False
        assert store.commit_field(sid, make_field(5, seed=9)) is False  # same index, other cells
        assert (store.counts(sid), len(store.cells(sid)), _files(data)) == before
        with store.session() as s:
            assert s.scalar(select(func.count()).select_from(Field)) == 1


def test_full_disk_rolls_back_and_retry_succeeds(store_url, tmp_path):  # noqa: F811
    """ENOSPC while the crops are written: no rows, no counts, no files; a retry commits."""
    calls = {"n": 0}
    lock = threading.Lock()

    def filling_disk(path: Path, data: bytes) -> None:
        with lock:
            calls["n"] += 1
            full = calls["n"] >= 4
        if full:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_file(path, data)

    data = tmp_path / "data"
    fld = make_field(7)
    with Store(store_url, data) as store:
        sid = store.create_slide("S-3", "virtual", "slide.json", 500, "pbc11")
        assert store.commit_field(sid, make_field(6))
    with Store(store_url, data, writer=filling_disk) as store:
        before = (store.counts(sid), len(store.cells(sid)), store.progress(sid))
        with pytest.raises(OSError) as exc:
            store.commit_field(sid, fld)
        assert exc.value.errno == errno.ENOSPC and 4 <= calls["n"] <= len(fld.cells) + 1
        assert (store.counts(sid), len(store.cells(sid)), store.progress(sid)) == before
        assert not any((data / ".staging").iterdir())
        assert _files(data) == _referenced(store, sid)
    with Store(store_url, data) as store:  # space freed: the same field commits once
        assert store.commit_field(sid, fld) is True
        assert store.progress(sid).last_index == 7
        assert _files(data) == _referenced(store, sid)


def test_status_transitions_and_claim(store_url, tmp_path):  # noqa: F811
    with Store(store_url, tmp_path / "data") as store:
        a = store.create_slide("A", "virtual", "a.json", 300, "pbc11")
        b = store.create_slide("B", "microscope", "scope.cfg", 500, "pbc11")
        with pytest.raises(StoreError, match="already exists"):
            store.create_slide("A", "virtual", "a.json", 300, "pbc11")
        assert store.claim_next("scope-1").id == a
        assert store.claim_next("scope-2").id == b
        assert store.claim_next("scope-1") is None
        assert store.slide("A").status == "acquiring" and store.slide("A").started_at
        assert store.slide("B").worker == "scope-2"
        with pytest.raises(StoreError, match="cannot go from acquiring to signed"):
            store.set_status(a, "signed")
        assert store.set_status(a, "awaiting_review", stopped_because="target_reached")
        assert not store.set_status(b, "failed", expect="queued")  # b is acquiring: no move
        assert store.slide(b).status == "acquiring"
        assert store.slide(a).finished_at is not None
        assert [s.name for s in store.slides(["acquiring"])] == ["B"]
        with pytest.raises(StoreError, match="no slide"):
            store.slide("nope")


def test_reviewed_counts_and_cascade(store_url, tmp_path):  # noqa: F811
    with Store(store_url, tmp_path / "data") as store:
        sid = store.create_slide("R", "virtual", "r.json", 500, "pbc11")
        fields = [make_field(i) for i in range(3)]
        for f in fields:
            store.commit_field(sid, f)
        assert store.reviewed_counts(sid) == store.counts(sid)
        with store.session() as s:
            first = s.scalars(select(Cell).where(Cell.slide_id == sid, Cell.duplicate_of.is_(None))
                              .order_by(Cell.id)).first()
            old = first.label
            first.reviewed_label = "monocyte" if old != "monocyte" else "lymphocyte"
            new = first.reviewed_label
        after = store.reviewed_counts(sid)
        assert after.get(old, 0) == store.counts(sid)[old] - 1
        assert after[new] == store.counts(sid).get(new, 0) + 1
        with store.session() as s:
            s.delete(s.get(Slide, sid))
        with store.session() as s:
            for table in (Field, Cell, Count):
                assert s.scalar(select(func.count()).select_from(table)) == 0


def test_sqlite_wal_foreign_keys_and_full_sync(tmp_path):
    db = tmp_path / "wal.db"
    Store(f"sqlite:///{db}", tmp_path / "data").close()
    with Store(f"sqlite:///{db}", tmp_path / "data") as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: power cuts
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == _head()


def _alembic(conn):
    from alembic.config import Config as AlembicConfig

    from daemon.store import MIGRATIONS

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def _head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic(None)).get_current_head()


def test_store_from_before_methods_were_recorded_migrates_with_its_fields(tmp_path, config):
    from alembic import command

    from daemon.report import build_report

    url, data = f"sqlite:///{tmp_path / 'old.db'}", tmp_path / "data"
    with Store(url, data) as store:
        sid = store.create_slide("BM-old", "virtual", "slide.tif", 500, "pbc11")
        for i in range(2):
            store.commit_field(sid, make_field(i))
        counts = store.counts(sid)
        with store.engine.begin() as conn:  # back to the schema the previous release wrote
            command.downgrade(_alembic(conn), "0003")
            assert "method" not in {c["name"] for c in inspect(conn).get_columns("fields")}
    method = {"software": "0.1.0", "model": "default.pt", "model_sha256": "0123456789abcdef",
              "precision": "int8", "crop_um_per_px": 0.2, "taxonomy": "pbc11",
              "settings": "abcdef012345"}
    with Store(url, data) as store:
        assert [f.method for f in store.fields(sid)] == [None, None]
        assert store.counts(sid) == counts
        store.commit_field(sid, make_field(2), method)
        rep = build_report(store, sid, config)
    assert [m["fields"] for m in rep["methods"]] == [2, 1]
    assert rep["methods"][1] == {**method, "fields": 1}
    assert any("not recorded" in f for f in rep["flags"] if f.startswith("counted with 2"))


@pytest.mark.parametrize("kill_in", ["0001", "0007"])
def test_a_migration_killed_part_way_leaves_a_store_that_opens(tmp_path, kill_in):
    """SIGKILL inside a migration (a power cut while the first start builds the schema, or
    while an upgrade alters a table): the next start finds the store as before the
    migration and migrates it whole. Each CREATE / ALTER had been committed on its own, and
    every later start failed on "table slides already exists"."""
    from alembic import command

    url, data = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "data"
    if kill_in == "0007":  # a store of the release before, with a slide in it
        with Store(url, data) as store:
            sid = store.create_slide("BM-1", "virtual", "slide.tif", 500, "pbc11")
            store.commit_field(sid, make_field(0))
            counts = store.counts(sid)
            with store.engine.begin() as conn:
                command.downgrade(_alembic(conn), "0006")
    # The second schema change of the migration kills the process, as a power cut would.
    hook = "create_index" if kill_in == "0001" else "add_column"
    code = textwrap.dedent(f"""
        import os, signal
        import alembic.op as op
        real, calls = op.{hook}, []
        def dying(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        op.{hook} = dying
        from daemon.store import Store
        Store({url!r}, {str(data)!r})
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    with Store(url, data) as store:  # opens, and migrates the rest
        if kill_in == "0007":
            assert store.counts(sid) == counts
        sid2 = store.create_slide("BM-2", "virtual", "slide.tif", 500, "pbc11")
        store.commit_field(sid2, make_field(0))
    db = sqlite3.connect(tmp_path / "m.db")
    try:
        assert db.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
    finally:
        db.close()


def test_downgrading_to_the_first_schema_and_back_keeps_every_row(tmp_path):
    """On SQLite, Alembic's batch mode rebuilds a table to drop a column, and dropping the old
    table deleted every field and cell of every slide (ON DELETE CASCADE)."""
    from alembic import command

    url, data = f"sqlite:///{tmp_path / 'old.db'}", tmp_path / "data"
    tables = ("slides", "fields", "cells", "counts")
    with Store(url, data) as store:
        sid = store.create_slide("BM-old", "virtual", "slide.tif", 500, "pbc11")
        for i in range(3):
            store.commit_field(sid, make_field(i))
        cells, counts = len(store.cells(sid)), store.counts(sid)
        with store.engine.begin() as conn:
            rows = [conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar() for t in tables]
            command.downgrade(_alembic(conn), "0001")
            assert [conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar()
                    for t in tables] == rows
    assert rows[2] == cells > 0
    with Store(url, data) as store:  # upgraded again on open
        assert len(store.fields(sid)) == 3 and len(store.cells(sid)) == cells
        assert store.counts(sid) == counts


def test_not_a_sqlite_file_is_refused_and_kept(tmp_path):
    bad = tmp_path / "results.db"
    content = (REPO / "config" / "default.yaml").read_bytes()
    bad.write_bytes(content)
    with pytest.raises(StoreError, match="not a SQLite database"):
        Store(f"sqlite:///{bad}", tmp_path / "data")
    assert bad.read_bytes() == content


def test_foreign_sqlite_database_is_refused(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO patients (name) VALUES ('x')")
    with pytest.raises(StoreError, match="not a marrowcount store"):
        Store(f"sqlite:///{other}", tmp_path / "data")
    with sqlite3.connect(other) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"patients"}


def test_unreachable_postgres_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="cannot open database"):
        Store("postgresql+psycopg://nobody:pw@127.0.0.1:1/none", tmp_path / "data")


_DIE = textwrap.dedent("""
    import os, sys
    from sqlalchemy import event
    from sqlalchemy.orm import Session
    from daemon.store import Store, write_file
    from tests.daemon_fixtures import make_field
    url, data, where = sys.argv[1:4]
    n = {"files": 0}
    def writer(path, payload):
        write_file(path, payload)
        n["files"] += 1
        if where == "writing" and n["files"] >= 5:
            os._exit(9)
    store = Store(url, data, writer=writer)
    sid = store.slide("K").id
    dirty = {}
    @event.listens_for(Session, "after_flush")
    def _flushed(session, ctx):
        dirty["x"] = True
    @event.listens_for(Session, "after_commit")
    def _committed(session):
        if where == "committed" and dirty:
            os._exit(9)
    store.commit_field(sid, make_field(int(sys.argv[4])))
""")


@pytest.mark.parametrize("where", ["writing", "committed"])
def test_killed_mid_commit_leaves_no_orphans(store_url, tmp_path, where):  # noqa: F811
    """A process dies while writing crops, or right after the DB commit but before the
    rename; the next open discards or finishes its staging folder."""
    data = tmp_path / "data"
    with Store(store_url, data) as store:
        sid = store.create_slide("K", "virtual", "k.json", 500, "pbc11")
        store.commit_field(sid, make_field(0))
    proc = subprocess.run([sys.executable, "-c", _DIE, store_url, str(data), where, "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert any((data / ".staging").iterdir())  # it really died mid-way
    with Store(store_url, data) as store:
        assert not any((data / ".staging").iterdir())
        committed = where == "committed"
        assert (store.progress(sid).last_index == 1) is committed
        assert _files(data) == _referenced(store, sid)
        fields = [make_field(0)] + ([make_field(1)] if committed else [])
        assert store.counts(sid) == expected_counts(fields)
        # Whatever happened, committing field 1 now leaves exactly one copy of it.
        store.commit_field(sid, make_field(1))
        assert store.counts(sid) == expected_counts([make_field(0), make_field(1)])
        assert _files(data) == _referenced(store, sid)


def test_migrations_build_exactly_the_models(store_url, tmp_path):  # noqa: F811
    """The schema Alembic builds equals daemon/models.py (a model change needs a migration)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from daemon.models import Base

    with Store(store_url, tmp_path / "data") as store, store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_a_scanned_file_past_2_gib_is_recorded(store_url, tmp_path):  # noqa: F811
    """Whole-slide files pass 2 GiB; PostgreSQL's INTEGER would refuse the size."""
    from daemon.models import ScannedFile

    size = 5 * 2**30 + 7
    with Store(store_url, tmp_path / "data") as store:
        with store.session() as s:
            s.add(ScannedFile(sha256="a" * 64, path="/scans/big.svs", size=size, state="done"))
        with store.session() as s:
            assert s.scalar(select(ScannedFile.size).where(ScannedFile.sha256 == "a" * 64)) == size


def test_every_crop_and_its_folder_are_on_disk_before_the_field_commits(tmp_path, monkeypatch):
    """A power cut right after a field's commit must not leave a counted cell whose crop is
    empty: each crop file and the staging folder's names are fsynced before the database
    transaction commits (os.fsync wrapped, not replaced; the commit seen by SQLAlchemy)."""
    import os
    import stat

    from sqlalchemy import event

    store = Store(f"sqlite:///{tmp_path / 'f.db'}", tmp_path / "data")
    sid = store.create_slide("S", "virtual", "s.tif", 100, "pbc11")
    store.claim(sid, "scope")
    log: list[tuple[str, str]] = []
    lock = threading.Lock()
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        kind = "fsync_dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync"
        with lock:
            log.append((kind, os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "fsync", fsync)
    event.listen(store.engine, "commit", lambda conn: log.append(("commit", "")))
    fld = make_field(0, seed=5, with_image=True)
    assert store.commit_field(sid, fld)
    store.close()
    commit = max(i for i, (what, _) in enumerate(log) if what == "commit")
    synced = {Path(p).name for what, p in log[:commit] if what == "fsync"}
    stage_dirs = [p for what, p in log[:commit] if what == "fsync_dir" and ".staging" in p]
    crops = {f"c{c.index:04d}.png" for c in fld.cells if c.crop is not None}
    assert crops and crops | {"field.png"} <= synced, sorted(synced)
    assert stage_dirs, "the staging folder's names were not fsynced before the commit"



def test_the_audit_trail_and_sign_offs_cannot_be_changed_or_deleted(store_url, tmp_path):  # noqa: F811
    """In the database itself (migration 0009): an audit event is never updated or deleted, a
    sign-off keeps its counts, its report is kept once, and a slide with a history cannot be
    deleted (one SQL DELETE had erased a signed slide's trail, and the backup followed)."""
    from sqlalchemy import delete, update
    from sqlalchemy.exc import DBAPIError

    from daemon.models import AuditEvent, Review

    with Store(store_url, tmp_path / "data") as store:
        sid = store.create_slide("S", "virtual", "s.tif", 100, "pbc11")
        store.audit("tech", "edit_case", sid, after={"accession": "A1"})
        with store.session() as s:
            s.add(Review(slide_id=sid, username="tech", action="sign", counts_before={"x": 1},
                         counts_after={"x": 1}))
        refused = [
            (update(AuditEvent).values(username="someone else"), "append-only"),
            (delete(AuditEvent), "append-only"),
            (update(Review).values(counts_after={"x": 2}), "kept as made"),
            (delete(Review), "kept as made"),
            (delete(Slide).where(Slide.id == sid), "kept as made|append-only"),
        ]
        if store.engine.dialect.name == "postgresql":  # row triggers miss TRUNCATE (0010)
            refused += [(text("TRUNCATE audit_events"), "append-only"),
                        (text("TRUNCATE slides CASCADE"), "append-only|kept as made")]
        for stmt, why in refused:
            with pytest.raises(DBAPIError, match=why):
                with store.session() as s:
                    s.execute(stmt)
        # What the software itself does to a review still works: the export marks, and the
        # issued report kept once, after the sign-off's row.
        with store.session() as s:
            s.execute(update(Review).values(exported_at=func.now()))
            s.execute(update(Review).values(report={"issue": 1}))
        with pytest.raises(DBAPIError, match="kept as issued"):
            with store.session() as s:
                s.execute(update(Review).values(report={"issue": 1, "changed": True}))
        with store.session() as s:
            assert s.scalar(select(func.count()).select_from(AuditEvent)) == 1
            assert s.scalars(select(Review)).one().report == {"issue": 1}


def test_a_table_rebuilt_by_a_migration_keeps_the_history(tmp_path):
    """SQLite migrations rebuild tables (alembic batch mode: copy, drop, rename). With
    foreign keys on, dropping the old `slides` cascaded to every review and audit event
    (refused by the 0009 triggers; without them, erased): migrations run with them off."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    from daemon.models import AuditEvent, Review

    with Store(f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "data") as store:
        sid = store.create_slide("S", "virtual", "s.tif", 100, "pbc11")
        store.audit("tech", "edit_case", sid, after={"accession": "A1"})
        with store.session() as s:
            s.add(Review(slide_id=sid, username="tech", action="sign", counts_before={"x": 1},
                         counts_after={"x": 1}))
        engine = store._migration_engine()
        try:
            with engine.begin() as conn:
                with Operations(MigrationContext.configure(conn)).batch_alter_table(
                        "slides", recreate="always"):
                    pass
        finally:
            engine.dispose()
        with store.session() as s:
            assert s.scalar(select(func.count()).select_from(AuditEvent)) == 1
            assert s.scalar(select(func.count()).select_from(Review)) == 1
            assert s.scalar(text("PRAGMA foreign_keys")) == 1  # on again outside migrations


def test_the_append_only_triggers_are_there_at_head(store_url, tmp_path):  # noqa: F811
    """A later migration that rebuilds `reviews` or `audit_events` (SQLite batch mode) drops
    their triggers without a word: it must create them again."""
    with Store(store_url, tmp_path / "data") as store, store.session() as s:
        if store.engine.dialect.name == "sqlite":
            names = set(s.scalars(text("SELECT name FROM sqlite_master WHERE type='trigger'")))
            expected = {"audit_events_no_update", "audit_events_no_delete", "reviews_no_delete",
                        "reviews_fixed", "reviews_report_once"}
        else:
            names = set(s.scalars(text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")))
            expected = {"audit_events_append_only", "reviews_no_delete", "reviews_fixed",
                        "reviews_report_once", "audit_events_no_truncate",
                        "reviews_no_truncate"}
    assert names == expected


def test_listing_slides_reads_their_counts_in_one_query_and_no_plans(tmp_path):
    """`status` and the queue list every slide: a scanner slide's plan runs to tens of kB,
    and reading each with one progress query apiece had taken 6 s for 2,000 slides."""
    from sqlalchemy import event
    from sqlalchemy.orm.exc import DetachedInstanceError

    store = Store(f"sqlite:///{tmp_path / 'l.db'}", tmp_path / "data")
    plan = {"driver": "folder", "version": 1, "files": [{"path": "/x.tif", "tiles": [[0, 0]]}]}
    ids = [store.create_slide(f"S{i}", "folder", "/x", 300, "pbc11", plan=plan)
           for i in range(3)]
    store.claim(ids[1], "scope")
    store.commit_field(ids[1], make_field(0))
    store.commit_field(ids[1], make_field(1))
    listed = store.slides(plan=False)
    with pytest.raises(DetachedInstanceError):
        _ = listed[0].plan  # never read: asking for it is a mistake, not a slow query
    queries: list[str] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda *a: queries.append(a[2]))
    progress = store.progress_of(ids)
    assert len(queries) == 1
    assert progress == {sid: store.progress(sid) for sid in ids}
    assert (progress[ids[1]].n_fields, progress[ids[1]].counted) == (
        2, make_field(0).n_counted + make_field(1).n_counted)
    assert progress[ids[0]].last_index is None and progress[ids[0]].next_index == 0
    store.close()
