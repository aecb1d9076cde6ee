"""Issued reports go to the folder the laboratory information system watches: a report per
sign-off, a withdrawal notice per reopening, each file whole, none lost when the folder is
away for a while, none sent twice. The slide is counted by the real pipeline on real BCCD
fields (tests.review_slide)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from pypdf import PdfReader
from sqlalchemy import select, update
from typer.testing import CliRunner

from daemon.cli import app
from daemon.models import Review
from daemon.report_export import ExportError, export_reports
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

STEM = SLIDE_NAME.replace(" ", "_")


def _lab(env, folder):
    return env.cfg.model_copy(update={"review": env.cfg.review.model_copy(update={
        "export_dir": folder, "export_formats": ["pdf", "json", "csv"]})})


def test_each_sign_off_and_reopening_reaches_the_lis_folder(review_env, tmp_path):
    env = review_env
    out = tmp_path / "lis"
    lab = _lab(env, out)
    check_flags(env.store, env.slide_id)
    tech = client_as(lab, env.store)
    assert sign_form(tech, env.slide_id).status_code == 303
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{STEM}-issue1.{f}" for f in ("csv", "json", "pdf")]  # no .part left
    rep = json.loads((out / f"{STEM}-issue1.json").read_text())
    assert rep["issue"]["number"] == 1 and rep["slide"]["status"] == "signed"
    assert "BCCD review slide" in PdfReader(out / f"{STEM}-issue1.pdf").pages[0].extract_text()

    sup = client_as(lab, env.store, SUPER)
    sup.post(f"/slides/{env.slide_id}/reopen", data={"csrf_token": sup.token,
                                                     "reason": "eosinophils over-called"})
    notice = json.loads((out / f"{STEM}-issue1-withdrawn.json").read_text())
    assert notice["notice"] == "withdrawn" and notice["issue"] == 1
    assert (notice["reopened_by"], notice["reason"]) == ("super", "eosinophils over-called")
    assert sign_form(sup, env.slide_id).status_code == 303
    amended = json.loads((out / f"{STEM}-issue2.json").read_text())
    assert amended["issue"]["amends"]["number"] == 1
    # Nothing is sent twice, and every row is marked.
    assert export_reports(env.store, lab) == []
    with env.store.session() as s:
        assert all(r.exported_at for r in s.scalars(select(Review)))


def test_a_folder_away_loses_nothing_and_history_is_sent_only_on_purpose(review_env, tmp_path):
    env = review_env
    check_flags(env.store, env.slide_id)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    tech = client_as(_lab(env, blocked), env.store)
    assert sign_form(tech, env.slide_id).status_code == 303  # the signature stands
    with env.store.session() as s:
        assert s.scalars(select(Review)).one().exported_at is None
    with pytest.raises(ExportError, match="not-a-folder"):
        export_reports(env.store, _lab(env, blocked))

    out = tmp_path / "lis"
    [done] = export_reports(env.store, _lab(env, out))  # the folder is back
    assert (done.issue, done.kind) == (1, "report") and len(done.paths) == 3

    # A sign-off from before the folder was set up goes only when asked for.
    with env.store.session() as s:
        s.execute(update(Review).values(exported_at=None,
                                        at=datetime.now(timezone.utc) - timedelta(days=30)))
    for p in out.iterdir():
        p.unlink()
    assert export_reports(env.store, _lab(env, out)) == []
    lab = tmp_path / "lab.yaml"
    lab.write_text(f"store:\n  url: {env.url}\n  data_dir: {env.root / 'data'}\n"
                   f"review:\n  export_dir: {out}\n")
    res = CliRunner().invoke(app, ["export-reports", "--since", "2020-01-01",
                                   "--config", str(lab)])
    assert res.exit_code == 0, res.output
    assert "BCCD review slide issue 1 (report)" in res.output
    assert sorted(p.name for p in out.iterdir()) == [f"{STEM}-issue1.{f}" for f in ("json", "pdf")]
