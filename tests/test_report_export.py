"""Issued reports go to the folder the laboratory information system watches: a report per
sign-off, a withdrawal notice per reopening, each file whole, none lost when the folder is
away for a while or one item cannot be written, none sent twice, none overwritten by another
slide's. The slide is counted by the real pipeline on real BCCD fields (tests.review_slide)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from pypdf import PdfReader
from sqlalchemy import select, update
from typer.testing import CliRunner

from daemon.cli import app
from daemon.models import Review
from daemon.report import freeze_report
from daemon.report_export import ExportError, export_reports
from daemon.review import actions
from tests.review_slide import (  # noqa: F401  (fixtures)
    SLIDE_NAME,
    SUPER,
    check_flags,
    client_as,
    pipeline_fields,
    review_env,
    review_template,
    sign_form,
)


def _lab(env, folder):
    return env.cfg.model_copy(update={"review": env.cfg.review.model_copy(update={
        "export_dir": folder, "export_formats": ["pdf", "json", "csv"]})})


def _stem(env) -> str:
    return f"{SLIDE_NAME.replace(' ', '_')}-{env.slide_id}"


def _signed(client, sid):
    assert sign_form(client, sid).status_code == 303
    assert client.app.state.exporter.wait_idle(60)


def test_each_sign_off_and_reopening_reaches_the_lis_folder(review_env, tmp_path):
    env = review_env
    out = tmp_path / "lis"
    lab, stem = _lab(env, out), _stem(env)
    check_flags(env.store, env.slide_id)
    tech = client_as(lab, env.store)
    _signed(tech, env.slide_id)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{stem}-issue1.{f}" for f in ("csv", "json", "pdf")]  # no .part left
    rep = json.loads((out / f"{stem}-issue1.json").read_text())
    assert rep["issue"]["number"] == 1 and rep["slide"]["status"] == "signed"
    assert "printed_at" not in rep  # the result as issued, the same each time it is written
    assert "BCCD review slide" in PdfReader(out / f"{stem}-issue1.pdf").pages[0].extract_text()

    sup = client_as(lab, env.store, SUPER)
    sup.post(f"/slides/{env.slide_id}/reopen", data={"csrf_token": sup.token,
                                                     "reason": "eosinophils over-called"})
    assert sup.app.state.exporter.wait_idle(60)
    notice = json.loads((out / f"{stem}-issue1-withdrawn.json").read_text())
    assert notice["notice"] == "withdrawn" and notice["issue"] == 1
    assert (notice["reopened_by"], notice["reason"]) == ("super", "eosinophils over-called")
    _signed(sup, env.slide_id)
    amended = json.loads((out / f"{stem}-issue2.json").read_text())
    assert amended["issue"]["amends"]["number"] == 1
    # Nothing is sent twice, and every row is marked.
    assert export_reports(env.store, lab).exported == []
    with env.store.session() as s:
        assert all(r.exported_at for r in s.scalars(select(Review)))


def test_a_reopened_slide_cancelled_tells_the_lis_no_amendment_will_follow(review_env,
                                                                            tmp_path):
    """Signed, reopened (the LIS got the report and its withdrawal), then cancelled (the
    wrong glass): the LIS and every reprint of issue 1 had kept saying "an amended report
    will follow", and the cancel had overwritten when and why counting ended."""
    from daemon.models import AuditEvent, Slide
    from daemon.report import issued_report, superseded_text
    from daemon.service import cancel_slide

    env = review_env
    out = tmp_path / "lis"
    lab, stem = _lab(env, out), _stem(env)
    check_flags(env.store, env.slide_id)
    _signed(client_as(lab, env.store), env.slide_id)
    sup = client_as(lab, env.store, SUPER)
    sup.post(f"/slides/{env.slide_id}/reopen", data={"csrf_token": sup.token,
                                                     "reason": "label does not match"})
    assert sup.app.state.exporter.wait_idle(60)
    with env.store.session() as s:
        was = s.get(Slide, env.slide_id)
        finished, stopped = was.finished_at, was.stopped_because
    cancel_slide(env.store, env.slide_id, "super", "wrong patient's glass")
    run = export_reports(env.store, lab)
    assert [(e.issue, e.kind) for e in run.exported] == [(1, "cancelled")]
    notice = json.loads((out / f"{stem}-issue1-cancelled.json").read_text())
    assert notice["notice"] == "cancelled" and notice["amended_report_follows"] is False
    assert (notice["cancelled_by"], notice["reason"]) == ("super", "wrong patient's glass")
    assert notice["case"] == json.loads((out / f"{stem}-issue1.json").read_text())[
        "slide"]["case"]
    sup_text = superseded_text(issued_report(env.store, env.slide_id, lab, issue=1)[
        "superseded"])
    assert "then cancelled by super" in sup_text and "no amended report will follow" in sup_text
    assert "an amended report will follow" not in sup_text
    with env.store.session() as s:
        now = s.get(Slide, env.slide_id)
        assert now.status == "failed" and now.error == "cancelled by super: wrong patient's glass"
        assert (now.finished_at, now.stopped_because) == (finished, stopped)
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "cancel")).one()
        assert event.before["stopped_because"] == stopped and event.before["finished_at"]
    page = sup.get(f"/slides/{env.slide_id}").text
    assert "cancelled by super" in page
    assert export_reports(env.store, lab).exported == []  # sent once


def test_a_folder_away_loses_nothing_and_history_is_sent_only_on_purpose(review_env, tmp_path):
    env = review_env
    check_flags(env.store, env.slide_id)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    _signed(client_as(_lab(env, blocked), env.store), env.slide_id)  # the signature stands
    with env.store.session() as s:
        assert s.scalars(select(Review)).one().exported_at is None
    with pytest.raises(ExportError, match="not-a-folder"):
        export_reports(env.store, _lab(env, blocked))
    # Exporting began with that attempt, before the sign-off: when the folder is mended days
    # later (a new install, its spool folder made last) the sign-off is still owed to the
    # LIS (the first success had set the start a day before itself, past the sign-off).
    marker = env.root / "data" / "export-since.txt"
    began = datetime.fromisoformat(marker.read_text().strip())
    with env.store.session() as s:
        assert began <= s.scalars(select(Review)).one().at.replace(tzinfo=timezone.utc)

    out = tmp_path / "lis"
    [done] = export_reports(env.store, _lab(env, out)).exported  # the folder is back
    assert (done.issue, done.kind) == (1, "report") and len(done.paths) == 3

    # A sign-off from before exporting began (a store that exported from a later day on)
    # goes only when asked for.
    with env.store.session() as s:
        s.execute(update(Review).values(exported_at=None, export_claimed_at=None))
    marker.write_text((datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat() + "\n")
    for p in out.iterdir():
        p.unlink()
    assert export_reports(env.store, _lab(env, out)).exported == []
    lab = tmp_path / "lab.yaml"
    lab.write_text(f"store:\n  url: {env.url}\n  data_dir: {env.root / 'data'}\n"
                   f"review:\n  export_dir: {out}\n")
    res = CliRunner().invoke(app, ["export-reports", "--since", "2020-01-01",
                                   "--config", str(lab)])
    assert res.exit_code == 0, res.output
    assert "BCCD review slide issue 1 (report)" in res.output
    assert sorted(p.name for p in out.iterdir()) == [
        f"{_stem(env)}-issue1.{f}" for f in ("json", "pdf")]


def test_slides_never_overwrite_each_other_and_one_bad_item_stops_nothing(review_env,
                                                                         tmp_path):
    """"BCCD review/slide" makes the same file-safe name as "BCCD review slide"; a name too
    long for the file system fails alone."""
    env = review_env
    tax = {env.cfg.taxonomy: env.cfg.classes}
    who = actions.Reviewer("tech", "technician")
    twin = env.store.create_slide("BCCD review/slide", "folder", "", 300, env.cfg.taxonomy)
    long_name = env.store.create_slide("Ж" * 150, "folder", "", 300, env.cfg.taxonomy)
    for sid in (long_name, env.slide_id, twin):
        if sid != env.slide_id:  # counted to nothing, as a slide with no field would be
            env.store.set_status(sid, "acquiring")
            env.store.set_status(sid, "awaiting_review")
        with env.store.session() as s:
            actions.sign(s, sid, who, "specimen inadequate", taxonomies=tax,
                         all_cells_seen=True)
        freeze_report(env.store, sid, env.cfg, at_sign_off=True)
    out = tmp_path / "lis"
    run = export_reports(env.store, _lab(env, out))
    assert sorted(e.slide for e in run.exported) == ["BCCD review slide", "BCCD review/slide"]
    a = json.loads((out / f"{_stem(env)}-issue1.json").read_text())
    b = json.loads((out / f"BCCD_review_slide-{twin}-issue1.json").read_text())
    assert (a["slide"]["id"], b["slide"]["id"]) == (env.slide_id, twin)
    [failed] = run.failed
    assert f"slide {long_name} sign" in failed and "too long" in failed.lower()
    with env.store.session() as s:  # left for the next run, after the folder is fixed
        assert s.scalars(select(Review).where(Review.slide_id == long_name)).one(
            ).exported_at is None


def test_a_claim_left_by_a_dead_exporter_is_taken_again(review_env, tmp_path):
    """An exporter that died between claiming a sign-off and writing it: a fresh claim is
    another exporter at work (skipped); one older than EXPORT_CLAIM_S is taken again."""
    from daemon.report_export import EXPORT_CLAIM_S

    env = review_env
    with env.store.session() as s:
        actions.sign(s, env.slide_id, actions.Reviewer("tech", "technician"))
    freeze_report(env.store, env.slide_id, env.cfg, at_sign_off=True)
    out = tmp_path / "lis"
    now = datetime.now(timezone.utc)
    with env.store.session() as s:
        s.execute(update(Review).values(export_claimed_at=now))
    # Meanwhile the slide is reopened and signed again: its withdrawal and issue 2 wait
    # behind the claimed issue 1 (the LIS must not get them first).
    sup = actions.Reviewer("super", "supervisor")
    with env.store.session() as s:
        actions.reopen(s, env.slide_id, sup, "recount")
    with env.store.session() as s:
        actions.sign(s, env.slide_id, sup)
    freeze_report(env.store, env.slide_id, env.cfg, at_sign_off=True)
    assert export_reports(env.store, _lab(env, out)).exported == []
    with env.store.session() as s:
        s.execute(update(Review).where(Review.export_claimed_at.is_not(None)).values(
            export_claimed_at=now - timedelta(seconds=EXPORT_CLAIM_S + 60)))
    done = export_reports(env.store, _lab(env, out)).exported
    assert [(d.issue, d.kind) for d in done] == [(1, "report"), (1, "withdrawn"), (2, "report")]
    assert all(p.exists() for p in done[0].paths)
    # Issue 1 goes as it was issued, not re-rendered as replaced.
    first = json.loads(next(p for p in done[0].paths if p.suffix == ".json").read_text())
    assert first["issue"]["number"] == 1 and "superseded" not in first
