"""A signed slide's report is kept as its sign-off issued it: printed again after the config
changed it says the same; a slide reopened and signed again issues an amended report that
names the one it replaces, and every issue stays printable. The slide is counted by the real
pipeline on real BCCD fields (tests.review_slide)."""

from __future__ import annotations

import csv
import io
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from pypdf import PdfReader
from sqlalchemy import select, text as sql
from typer.testing import CliRunner

from daemon.cli import app
from daemon.models import AuditEvent, Cell, Review, Slide
from daemon.report import (
    build_report,
    freeze_report,
    issued_report,
    report_csv,
    report_pdf,
    when_text,
    write_report,
)
from daemon.review import actions
from daemon.review.app import create_app
from daemon.store import StoreError
from tests.review_slide import (  # noqa: F401  (fixtures)
    SUPER,
    TECH,
    check_flags,
    login,
    pipeline_fields,
    review_env,
    review_template,
    sign_form,
)

tech, sup = actions.Reviewer("tech", "technician"), actions.Reviewer("super", "supervisor")


def _tax(env):
    return {env.cfg.taxonomy: env.cfg.classes}


def _counts(rep) -> dict[str, int]:
    return {c["name"]: c["n"] for c in rep["differential"]["classes"]}


def _kept_cells(env, n: int, not_label: str) -> list[int]:
    with env.store.session() as s:
        return list(s.scalars(select(Cell.id).where(
            Cell.slide_id == env.slide_id, Cell.duplicate_of.is_(None),
            Cell.excluded.is_(False), Cell.label != not_label).order_by(Cell.id).limit(n)))


def _monocytes_myeloid(cfg):
    """The lab's config after it moved monocytes to the myeloid side of M:E."""
    classes = tuple(c.model_copy(update={"lineage": "myeloid"}) if c.name == "monocyte" else c
                    for c in cfg.taxonomies[cfg.taxonomy])
    return cfg.model_copy(update={"taxonomies": {**cfg.taxonomies, cfg.taxonomy: classes}})


def _sign(env, who, note=None):
    """Sign as the review app does: the signature, then the report kept."""
    with env.store.session() as s:
        actions.sign(s, env.slide_id, who, note)
    return freeze_report(env.store, env.slide_id, env.cfg, at_sign_off=True)


def test_a_signed_report_prints_as_issued_after_the_config_changes(review_env, tmp_path):
    env = review_env
    with env.store.session() as s:
        actions.reclassify(s, env.slide_id, _kept_cells(env, 2, "monocyte"), "monocyte", tech,
                           _tax(env))
    issued = _sign(env, tech, "checked")
    assert issued["issue"] == {"number": 1, "signed_by": "tech", "signed_role": "technician",
                               "signed_at": issued["review"]["signed_at"],
                               "kept_at_sign_off": True, "amends": None}
    assert issued["basis"] == "reviewed" and issued["slide"]["status"] == "signed"

    changed = _monocytes_myeloid(env.cfg)
    fresh = build_report(env.store, env.slide_id, changed)
    assert fresh["differential"]["myeloid"] == issued["differential"]["myeloid"] + _counts(
        issued)["monocyte"]  # what a reprint built anew would now say
    again = issued_report(env.store, env.slide_id, changed)
    assert again["differential"] == issued["differential"]
    assert again["generated_at"] == issued["generated_at"] and again["printed_at"]
    assert again["superseded"] is None
    assert {k: v for k, v in again.items() if k not in ("printed_at", "superseded")} == issued

    pdf = tmp_path / "reprint.pdf"
    write_report(env.store, env.slide_id, changed, "pdf", pdf)
    text = " ".join(" ".join(p.extract_text() for p in PdfReader(pdf).pages).split())
    assert f"issue 1, issued {when_text(issued['generated_at'])}" in text and "printed " in text
    pages = len(PdfReader(pdf).pages)
    for page in range(1, pages + 1):  # every page's foot
        assert f"signed report, issue 1 · BCCD review slide page {page} of {pages}" in text
    assert "Amended report" not in text and "after the sign-off" not in text
    assert f"myeloid {issued['differential']['myeloid']}," in text


def test_signing_again_after_a_reopen_issues_an_amended_report(review_env, tmp_path):
    env = review_env
    first = _sign(env, tech)
    with env.store.session() as s:
        actions.reopen(s, env.slide_id, sup, "two eosinophils were basophils")
    assert issued_report(env.store, env.slide_id, env.cfg)["issue"] is None  # preliminary now
    withdrawn = issued_report(env.store, env.slide_id, env.cfg, issue=1)["superseded"]
    assert withdrawn["by_issue"] is None and withdrawn["reopened_by"] == "super"
    [cell] = _kept_cells(env, 1, "basophil")
    with env.store.session() as s:
        actions.reclassify(s, env.slide_id, [cell], "basophil", sup, _tax(env))
    second = _sign(env, sup, "corrected")

    assert second["issue"]["number"] == 2
    assert second["issue"]["amends"] == {
        "number": 1, "signed_by": "tech", "signed_at": first["issue"]["signed_at"],
        "counts": first["review"]["counts_after"],
        "reopened_by": "super", "reopened_at": second["issue"]["amends"]["reopened_at"],
        "reason": "two eosinophils were basophils", "case_changed": {}}
    assert _counts(second)["basophil"] == _counts(first)["basophil"] + 1
    # The first issue is still printable as it was.
    one = issued_report(env.store, env.slide_id, env.cfg, issue=1)
    assert _counts(one) == _counts(first) and one["issue"]["number"] == 1
    assert one["superseded"] == {"by_issue": 2, "signed_by": "super",
                                 "signed_at": second["issue"]["signed_at"]}
    current = issued_report(env.store, env.slide_id, env.cfg)
    assert current["issue"]["number"] == 2 and current["superseded"] is None
    with pytest.raises(StoreError, match="has no issue 3: it was signed 2 times"):
        issued_report(env.store, env.slide_id, env.cfg, issue=3)

    rows = list(csv.DictReader(io.StringIO(report_csv(second))))
    [row] = [r for r in rows if r["quantity"] == "ISSUE"]
    assert row["n"] == "2" and row["label"].startswith(
        "Amended report, issue 2, signed by super (supervisor)")
    assert "replaces issue 1 signed by tech" in row["label"]
    pdf = tmp_path / "amended.pdf"
    write_report(env.store, env.slide_id, env.cfg, "pdf", pdf)
    text = " ".join(" ".join(p.extract_text() for p in PdfReader(pdf).pages).split())
    assert "Amended report, issue 2, signed by super (supervisor)" in text
    assert "reopened by super" in text and "two eosinophils were basophils" in text
    assert "before review issue 1 after review" in text  # the counts it replaces, beside
    write_report(env.store, env.slide_id, env.cfg, "pdf", pdf, issue=1)
    text = " ".join(" ".join(p.extract_text() for p in PdfReader(pdf).pages).split())
    assert "Replaced by issue 2, signed by super" in text and "no longer valid" in text
    assert text.count("REPLACED BY ISSUE 2: NOT VALID") == len(PdfReader(pdf).pages)
    rows = list(csv.DictReader(io.StringIO(report_csv(one))))
    assert [r["label"] for r in rows if r["quantity"] == "SUPERSEDED"] == [
        f"Replaced by issue 2, signed by super at {when_text(second['issue']['signed_at'])}: this "
        "report is no longer valid"]


def test_a_signature_whose_report_was_not_kept_keeps_it_at_the_first_print(review_env,
                                                                           tmp_path):
    """The process died between signing and keeping the report (or the slide was signed
    before reports were kept): the first print keeps it, and later prints repeat that."""
    env = review_env
    with env.store.session() as s:
        actions.sign(s, env.slide_id, tech)
        assert s.scalars(select(Review).where(Review.action == "sign")).one().report is None
    first = issued_report(env.store, env.slide_id, env.cfg)
    assert first["issue"]["number"] == 1 and first["issue"]["kept_at_sign_off"] is False
    with env.store.session() as s:
        assert s.scalars(select(Review).where(Review.action == "sign")).one().report[
            "generated_at"] == first["generated_at"]
    later = issued_report(env.store, env.slide_id, _monocytes_myeloid(env.cfg))
    assert later["differential"] == first["differential"]
    pdf = tmp_path / "late.pdf"
    write_report(env.store, env.slide_id, env.cfg, "pdf", pdf)
    text = " ".join(" ".join(p.extract_text() for p in PdfReader(pdf).pages).split())
    assert (f"this report was kept at {when_text(first['generated_at'])}, after the sign-off"
            in text)

    # Reopened before anyone printed it: that issue was never kept, and says so.
    with env.store.session() as s:
        # A store from before reports were kept (and before 0009 kept them fixed).
        s.execute(sql("DROP TRIGGER reviews_report_once"))
        s.execute(Review.__table__.update().values(report=None))
        actions.reopen(s, env.slide_id, sup, "recount")
    with pytest.raises(StoreError, match="issue 1 of slide .* was signed before marrowcount"):
        issued_report(env.store, env.slide_id, env.cfg, issue=1)
    assert freeze_report(env.store, env.slide_id, env.cfg) is None  # not signed now


def test_the_review_app_keeps_the_report_and_serves_each_issue(review_env, tmp_path):
    env = review_env
    check_flags(env.store, env.slide_id)
    client = TestClient(create_app(env.cfg, env.store))
    token = login(client, TECH)
    r = sign_form(client, env.slide_id, token)
    assert r.status_code == 303
    with env.store.session() as s:
        kept = s.scalars(select(Review).where(Review.action == "sign")).one().report
    assert kept["issue"]["number"] == 1 and kept["slide"]["status"] == "signed"

    page = client.get(f"/slides/{env.slide_id}").text
    assert f'href="/slides/{env.slide_id}/report.pdf?issue=1"' in page
    r = client.get(f"/slides/{env.slide_id}/report.json?issue=1")
    assert r.status_code == 200 and r.json()["issue"]["number"] == 1
    assert (f'filename="BCCD_review_slide-{env.slide_id}-signed.json"'
            in r.headers["content-disposition"])
    r = client.get(f"/slides/{env.slide_id}/report.csv?issue=2")
    assert r.status_code == 404 and "has no issue 2" in r.text

    lab = tmp_path / "lab.yaml"
    lab.write_text(f"store:\n  url: {env.url}\n  data_dir: {env.root / 'data'}\n")
    res = CliRunner().invoke(app, ["report", str(env.slide_id), "--issue", "1",
                                   "--config", str(lab)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["issue"]["number"] == 1
    res = CliRunner().invoke(app, ["report", str(env.slide_id), "--issue", "2",
                                   "--config", str(lab)])
    assert res.exit_code != 0 and "has no issue 2" in str(res.exception)


def _reopen_as_supervisor(env, reason: str) -> TestClient:
    """Reopen the slide through the review app, as a supervisor; returns the client."""
    client = TestClient(create_app(env.cfg, env.store))
    token = login(client, SUPER)
    r = client.post(f"/slides/{env.slide_id}/reopen", data={"csrf_token": token,
                                                            "reason": reason},
                    follow_redirects=False)
    assert r.status_code == 303
    return client


def test_a_reopening_keeps_the_signed_report_first(review_env):
    """Signed, its report not yet kept (the keeping failed): the reopening keeps it, so the
    issue stays printable after the slide changes."""
    env = review_env
    with env.store.session() as s:
        actions.sign(s, env.slide_id, tech)
    client = _reopen_as_supervisor(env, "recount")
    one = issued_report(env.store, env.slide_id, env.cfg, issue=1)
    assert one["slide"]["status"] == "signed" and one["basis"] == "reviewed"
    assert one["superseded"]["reason"] == "recount"
    row = next(r for r in client.get("/api/queue").json()["slides"] if r["id"] == env.slide_id)
    assert "reopened by super: recount" in row["flags"]  # signed once: not new work
    r = client.get(f"/slides/{env.slide_id}/report.pdf?issue=1")
    assert '-signed-superseded.pdf"; filename*=' in r.headers["content-disposition"]


def test_two_signers_at_once_sign_once(review_env):
    """Two sign-offs of one slide at the same moment (a double click, two reviewers): the
    second waits for the first and then finds the slide signed (on SQLite too, which has no
    SELECT ... FOR UPDATE)."""
    env = review_env
    second: list[BaseException] = []

    def sign_too() -> None:
        try:
            with env.store.session() as s:
                actions.sign(s, env.slide_id, sup)
        except BaseException as exc:  # noqa: BLE001  (the outcome is asserted below)
            second.append(exc)

    with env.store.session() as s:
        actions.sign(s, env.slide_id, tech)
        other = threading.Thread(target=sign_too)
        other.start()
        time.sleep(0.5)  # the other sign-off reads the slide while this one is not committed
    other.join(30)
    assert len(second) == 1 and isinstance(second[0], actions.Locked), second
    with env.store.session() as s:
        assert [r.username for r in s.scalars(select(Review).where(
            Review.action == "sign"))] == ["tech"]


def test_a_reopening_goes_on_when_the_report_cannot_be_kept(review_env):
    """Signed under a taxonomy the config has since lost, its report never kept: the
    supervisor can still reopen the slide to correct it, and the audit trail says why the
    issue was not kept."""
    env = review_env
    with env.store.session() as s:
        actions.sign(s, env.slide_id, tech)
        s.execute(Slide.__table__.update().where(Slide.id == env.slide_id)
                  .values(taxonomy="lab12"))
    client = _reopen_as_supervisor(env, "recount")
    with env.store.session() as s:
        assert s.get(Slide, env.slide_id).status == "awaiting_review"
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "reopen")).one()
    assert "taxonomy 'lab12', which this config lacks" in ev.after["report_not_kept"]


def test_an_amended_report_with_the_same_counts_says_so(review_env, tmp_path):
    env = review_env
    _sign(env, tech)
    with env.store.session() as s:
        actions.reopen(s, env.slide_id, sup, "recount")
    # The patient is corrected while reopened: the same counts now belong to someone else,
    # and the amendment must say so, not only "counts unchanged".
    with env.store.session() as s:
        actions.set_case(s, env.slide_id, {"patient_id": "MRN-999"}, sup)
    second = _sign(env, sup)
    assert second["issue"]["amends"]["case_changed"] == {"patient_id": [None, "MRN-999"]}
    new = tmp_path / "new.pdf"
    report_pdf(second, new)
    text = " ".join(" ".join(p.extract_text() for p in PdfReader(new).pages).split())
    assert "Amended report, issue 2" in text and "Counts unchanged from issue 1." in text
    assert "CASE CHANGED since issue 1: Patient ID (none) → MRN-999" in text
