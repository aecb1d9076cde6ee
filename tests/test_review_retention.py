"""Field-image retention on a slide counted by the real pipeline: only old signed slides lose
their field images; crops, counts, report, export and audit stay; a dry run changes nothing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from daemon.cli import app
from daemon.models import AuditEvent, Cell, Field, Slide
from daemon.report import build_report
from daemon.retention import purge_field_images
from daemon.review import actions
from daemon.review.app import create_app
from daemon.reviewed import export_reviewed, reviewed_cells, signed_slides
from tests.review_slide import (  # noqa: F401  (fixtures)
    SUPER,
    TECH,
    count_slide,
    login,
    pipeline_fields,
    review_env,
    review_template,
)

WHO = actions.Reviewer(TECH[0], "technician")


def _images(env, sid):
    with env.store.session() as s:
        return [f.image_path for f in s.scalars(select(Field).where(Field.slide_id == sid))]


def _crops(env, sid):
    with env.store.session() as s:
        return [c.crop_path for c in s.scalars(select(Cell).where(Cell.slide_id == sid))]


def test_purge_deletes_only_old_signed_field_images(review_env, pipeline_fields, tmp_path):
    env = review_env
    with env.store.session() as s:
        actions.sign(s, env.slide_id, WHO, "normal differential")
    waiting = count_slide(env.store, env.cfg, "not yet signed", pipeline_fields[:5])
    # A failed slide (no result: the wrong glass, cancelled) had kept its images for ever.
    failed = count_slide(env.store, env.cfg, "wrong glass", pipeline_fields[:3], status="failed")
    failed_images = _images(env, failed)
    assert len(failed_images) == 3 and all(failed_images)
    images = [p for p in _images(env, env.slide_id) if p]
    crops = [p for p in _crops(env, env.slide_id) if p]
    assert len(images) == len(pipeline_fields) and crops
    report_before = build_report(env.store, env.slide_id, env.cfg)
    now = datetime.now(timezone.utc)

    # Signed just now: not older than a day, so nothing goes.
    assert purge_field_images(env.store, now - timedelta(days=1), "ops") == []
    dry = purge_field_images(env.store, now + timedelta(minutes=1), "ops", dry_run=True)
    assert [(p.slide, p.status, p.fields, p.missing) for p in dry] == [
        ("BCCD review slide", "signed", len(images), 0), ("wrong glass", "failed", 3, 0)]
    assert dry[0].bytes == sum(env.store.path(p).stat().st_size for p in images)
    assert all(env.store.path(p).is_file() for p in images)
    assert _images(env, env.slide_id) == images

    env.store.path(images[0]).unlink()  # lost before the purge: its row is cleared too
    done = purge_field_images(env.store, now + timedelta(minutes=1), "ops")
    assert [(p.fields, p.missing) for p in done] == [(len(images), 1), (3, 0)]
    assert not any(env.store.path(p).exists() for p in images + failed_images)
    assert _images(env, env.slide_id) == [None] * len(images)
    assert all(env.store.path(p).is_file() for p in crops)  # crops stay
    # The slide not signed keeps its field images, and a second run finds nothing to do.
    assert all(env.store.path(p).is_file() for p in _images(env, waiting))
    assert purge_field_images(env.store, now + timedelta(minutes=1), "ops") == []
    with env.store.session() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "purge_field_images")).all()
        assert [(e.username, e.slide_id, e.before["fields_with_image"], e.after["status"])
                for e in ev] == [("ops", env.slide_id, len(images), "signed"),
                                 ("ops", failed, 3, "failed")]

    # The report is unchanged; export falls back to the crops.
    report_after = build_report(env.store, env.slide_id, env.cfg)
    assert report_after["differential"] == report_before["differential"]
    cells = reviewed_cells(env.store, signed_slides(env.store, env.cfg.taxonomy))
    res = export_reviewed(env.store, cells, tmp_path / "export", env.cfg.classes, 0.2, 128)
    assert res["written"] > 0
    assert ",crop\n" in (tmp_path / "export" / "cells.csv").read_text()

    # Reopened, the slide's fields say the image is gone and refuse an added cell.
    client = TestClient(create_app(env.cfg, env.store))
    client.headers["X-CSRF-Token"] = login(client, SUPER)
    with env.store.session() as s:
        actions.reopen(s, env.slide_id, actions.Reviewer(SUPER[0], "supervisor"), "recount")
        fid = s.scalar(select(Field.id).where(Field.slide_id == env.slide_id))
    page = client.get(f"/slides/{env.slide_id}/fields/{fid}").text
    assert "image was not kept" in page
    assert client.get(f"/images/fields/{fid}").status_code == 404
    r = client.post(f"/api/slides/{env.slide_id}/cells",
                    json={"field_id": fid, "x": 100, "y": 100, "label": "lymphocyte"})
    assert r.status_code == 400 and "image was not kept" in r.text


def test_purge_command_needs_one_cut_off_and_reports_sizes(review_env):
    env = review_env
    with env.store.session() as s:
        actions.sign(s, env.slide_id, WHO, None)
    args = ["purge-images", "--db", env.url, "--data-dir", str(env.root / "data")]
    runner = CliRunner()
    res = runner.invoke(app, args)
    assert res.exit_code != 0 and "exactly one of --older-than-days" in str(res.exception)
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%d")
    # A date in the future (a mistyped year) would purge slides signed minutes ago.
    res = runner.invoke(app, [*args, "--signed-before", tomorrow, "--dry-run"])
    assert res.exit_code != 0 and "is in the future" in str(res.exception)
    with env.store.session() as s:
        s.get(Slide, env.slide_id).signed_at = datetime.now(timezone.utc) - timedelta(days=10)
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    res = runner.invoke(app, [*args, "--signed-before", today, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "BCCD review slide (signed " in res.output
    assert "would delete 40 field images" in res.output
    assert all(_images(env, env.slide_id))
    res = runner.invoke(app, [*args, "--older-than-days", "30"])
    assert res.exit_code == 0 and "0 slides signed or failed before" in res.output
    res = runner.invoke(app, [*args, "--signed-before", today, "--by", "nightly"])
    assert res.exit_code == 0 and "deleted 40 field images" in res.output
    assert not any(_images(env, env.slide_id))


def test_a_slide_reopened_during_the_purge_keeps_its_images(review_env, monkeypatch):
    """The reopening commits between the purge reading the slide and clearing its rows (on
    SQLite a SELECT ... FOR UPDATE locks nothing): the reopening wins."""
    import daemon.retention as retention

    env = review_env
    with env.store.session() as s:
        actions.sign(s, env.slide_id, WHO, None)
    images = [p for p in _images(env, env.slide_id) if p]
    real_path, reopened = env.store.path, []

    def path_then_reopen(rel):
        if not reopened:  # the purge has read the slide as signed: a supervisor reopens it
            with env.store.session() as s:
                actions.reopen(s, env.slide_id, actions.Reviewer(SUPER[0], "supervisor"), "x")
            reopened.append(True)
        return real_path(rel)

    monkeypatch.setattr(env.store, "path", path_then_reopen)
    done = retention.purge_field_images(env.store, datetime.now(timezone.utc)
                                        + timedelta(minutes=1), "ops")
    monkeypatch.undo()
    assert reopened and done == []
    assert _images(env, env.slide_id) == images
    assert all(env.store.path(p).is_file() for p in images)


def test_an_image_that_cannot_be_deleted_is_reported_and_the_rest_go(review_env, monkeypatch,
                                                                    caplog):
    import os

    import daemon.retention as retention

    env = review_env
    with env.store.session() as s:
        actions.sign(s, env.slide_id, WHO, None)
    images = [env.store.path(p) for p in _images(env, env.slide_id) if p]
    real_unlink = os.unlink

    def unlink(p):  # the first file sits on a read-only share
        if p == images[0]:
            raise PermissionError(13, "Permission denied", str(p))
        real_unlink(p)

    monkeypatch.setattr(retention.os, "unlink", unlink)
    (item,) = retention.purge_field_images(env.store, datetime.now(timezone.utc)
                                           + timedelta(minutes=1), "ops")
    assert item.not_deleted == 1 and item.fields == len(images)
    assert images[0].is_file() and not any(p.is_file() for p in images[1:])
    assert "could not be deleted" in caplog.text and "Permission denied" in caplog.text
