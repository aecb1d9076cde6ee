"""A slide's case (patient, specimen): given at submit or completed on the review page,
audited, locked with the signature, required for sign-off where the lab says so, and printed
on every report format."""

from __future__ import annotations

import csv
import getpass
import io
import json
import os

from pypdf import PdfReader
from sqlalchemy import select
from typer.testing import CliRunner

from daemon.cli import app
from daemon.models import AuditEvent, Slide
from daemon.report import build_report, report_csv, write_report
from tests.review_slide import (  # noqa: F401  (fixtures)
    SUPER,
    TECH,
    check_flags,
    client_as,
    pipeline_fields,
    review_env,
    review_template,
    seen_of,
    sign_form,
)

CASE = {"accession": "BM26-00417", "patient_id": "MRN 0042 17", "patient_name": "Doe, Jane",
        "specimen": "bone marrow aspirate, left PSIS", "collected_on": "2026-11-30"}



def _post_case(client, sid, **values):
    return client.post(f"/slides/{sid}/case", data={"csrf_token": client.token, **values},
                       follow_redirects=False)



def test_the_case_is_entered_on_the_slide_page_and_audited(review_env):
    env = review_env
    tech = client_as(env.cfg, env.store)
    page = tech.get(f"/slides/{env.slide_id}").text
    assert 'id="case-form"' in page and 'name="accession"' in page

    r = _post_case(tech, env.slide_id, **{**CASE, "patient_name": "  Doe,   Jane "})
    assert r.status_code == 303
    with env.store.session() as s:
        assert s.get(Slide, env.slide_id).case_info == CASE  # whitespace folded
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "edit_case")).one()
    assert (ev.username, ev.before, ev.after) == (TECH[0], {}, CASE)
    page = tech.get(f"/slides/{env.slide_id}").text
    assert 'value="BM26-00417"' in page and 'value="2026-11-30"' in page
    assert "BM26-00417" in tech.get("/").text  # the queue shows the accession

    # Saving the same values again is no change; clearing a field is one audited change.
    _post_case(tech, env.slide_id, **CASE)
    r = _post_case(tech, env.slide_id, **{**CASE, "patient_name": ""})
    assert r.status_code == 303
    with env.store.session() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "edit_case")).all()
        assert "patient_name" not in s.get(Slide, env.slide_id).case_info
    assert len(events) == 2 and events[1].before["patient_name"] == "Doe, Jane"


def test_bad_case_values_are_refused_by_name_and_change_nothing(review_env):
    env = review_env
    tech = client_as(env.cfg, env.store)
    r = _post_case(tech, env.slide_id, **{**CASE, "collected_on": "30/11/2026",
                                          "accession": "A" * 65})
    assert r.status_code == 400
    assert "Collected:" in r.text and "Accession:" in r.text
    with env.store.session() as s:
        assert s.get(Slide, env.slide_id).case_info is None
        assert not s.scalars(select(AuditEvent).where(AuditEvent.action == "edit_case")).all()


def test_sign_off_needs_the_cases_required_fields_and_locks_them(review_env):
    env = review_env
    check_flags(env.store, env.slide_id)
    lab = env.cfg.model_copy(update={"review": env.cfg.review.model_copy(update={
        "require_case": ["accession", "patient_id"]})})
    tech = client_as(lab, env.store)
    assert tech.get(f"/slides/{env.slide_id}").text.count('title="needed before sign-off"') == 2
    _post_case(tech, env.slide_id, accession="BM26-00417")
    r = sign_form(tech, env.slide_id)
    assert r.status_code == 400 and "fill in Patient ID under Case" in r.text
    with env.store.session() as s:
        assert s.get(Slide, env.slide_id).status == "awaiting_review"
    _post_case(tech, env.slide_id, accession="BM26-00417", patient_id="MRN 0042 17")
    assert sign_form(tech, env.slide_id).status_code == 303

    page = tech.get(f"/slides/{env.slide_id}").text
    assert 'id="case-form"' not in page and "MRN 0042 17" in page
    r = _post_case(tech, env.slide_id, accession="changed after signing")
    assert r.status_code == 409
    with env.store.session() as s:
        assert s.get(Slide, env.slide_id).case_info["accession"] == "BM26-00417"


def test_the_patients_other_results_are_shown_and_a_second_name_under_one_id_is_pointed_out(
        review_env, pipeline_fields):
    """A delta check: the reviewer sees the patient's other signed results (blasts, M:E) and
    is told when the patient ID is another name on an earlier slide (two patients under one
    ID, or a name mistyped)."""
    from daemon.review.app import value_text
    from tests.review_slide import count_slide

    env = review_env
    tech = client_as(env.cfg, env.store)
    _post_case(tech, env.slide_id, **CASE)
    check_flags(env.store, env.slide_id)
    assert sign_form(tech, env.slide_id).status_code == 303
    d = build_report(env.store, env.slide_id, env.cfg)["differential"]
    later = count_slide(env.store, env.cfg, "BM-follow-up", pipeline_fields)
    stranger = count_slide(env.store, env.cfg, "BM-other-patient", pipeline_fields)
    _post_case(tech, later, patient_id=CASE["patient_id"], patient_name="doe,  JANE")
    _post_case(tech, stranger, patient_id="MRN 9999", patient_name=CASE["patient_name"])

    page = tech.get(f"/slides/{later}").text
    assert 'id="other-results"' in page and f'href="/slides/{env.slide_id}"' in page
    assert f"<td>{d['total']}</td>" in page
    assert f"{value_text(d['blast_pct'], 1)} %" in page
    assert f"<td>{value_text(d['me_ratio'], 2, missing='∞')}</td>" in page
    assert 'id="name-differs"' not in page  # the same name, typed differently
    assert 'id="other-results"' not in tech.get(f"/slides/{stranger}").text

    _post_case(tech, later, patient_id=CASE["patient_id"], patient_name="Roe, Richard")
    page = tech.get(f"/slides/{later}").text
    assert 'id="name-differs"' in page and "is also <strong>Doe, Jane</strong>" in page
    # The signed slide shows no result of its own, and nothing unsigned.
    assert 'id="other-results"' not in tech.get(f"/slides/{env.slide_id}").text


def test_every_report_format_names_the_case(review_env, tmp_path):
    env = review_env
    tech = client_as(env.cfg, env.store)
    rep = build_report(env.store, env.slide_id, env.cfg)
    assert rep["slide"]["case"] == dict.fromkeys(CASE)  # every key, none set
    _post_case(tech, env.slide_id, **CASE)
    rep = build_report(env.store, env.slide_id, env.cfg)
    assert rep["report_version"] == 8 and rep["slide"]["case"] == CASE

    rows = list(csv.DictReader(io.StringIO(report_csv(rep))))
    assert {r["label"]: r["value"] for r in rows if r["quantity"] == "CASE"} == CASE
    assert len({len(r) for r in csv.reader(io.StringIO(report_csv(rep)))}) == 1

    pdf = tmp_path / "case.pdf"
    write_report(env.store, env.slide_id, env.cfg, "pdf", pdf)
    text = " ".join(PdfReader(pdf).pages[0].extract_text().split())
    for label, value in [("Accession", "BM26-00417"), ("Patient ID", "MRN 0042 17"),
                         ("Patient name", "Doe, Jane"), ("Collected", "2026-11-30")]:
        assert f"{label} {value}" in text
    assert json.loads(tech.get(f"/slides/{env.slide_id}/report.json").text)["slide"][
        "case"] == CASE


def test_submit_takes_the_case_and_refuses_a_bad_date(tmp_path):
    slide = tmp_path / "slide.tif"
    _tiny_slide(slide)
    lab = tmp_path / "lab.yaml"
    lab.write_text(f"store:\n  url: sqlite:///{tmp_path / 's.db'}\n  data_dir: {tmp_path / 'd'}\n")
    runner = CliRunner()
    res = runner.invoke(app, ["submit", str(slide), "-c", str(lab), "--collected-on",
                              "2026-02-30", "--accession", "BM26-1"])
    assert res.exit_code != 0 and "Collected:" in str(res.exception)
    res = runner.invoke(app, ["submit", str(slide), "-c", str(lab), "--collected-on",
                              "02/12/2026"])  # a day-first or month-first date: neither taken
    assert "'02/12/2026' is not a date as YYYY-MM-DD" in str(res.exception)
    assert not (tmp_path / "s.db").exists()  # refused before the store was opened
    res = runner.invoke(app, ["submit", str(slide), "-c", str(lab), "--json", "--accession",
                              " BM26-1 ", "--specimen", "bone marrow aspirate",
                              "--collected-on", "2026-11-30"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["case"] == {"accession": "BM26-1",
                                              "specimen": "bone marrow aspirate",
                                              "collected_on": "2026-11-30"}
    res = runner.invoke(app, ["status", "-c", str(lab), "--json"])
    assert [r["accession"] for r in json.loads(res.stdout)] == ["BM26-1"]
    # Who tied the glass to this case at submission is audited, as later edits are.
    res = runner.invoke(app, ["audit", "-c", str(lab), "--json"])
    [ev] = [json.loads(x) for x in res.stdout.splitlines()]
    assert (ev["user"], ev["action"], ev["after"]["case"]["accession"]) == (
        os.environ.get("SUDO_USER") or getpass.getuser(), "submit", "BM26-1")


def _tiny_slide(path):
    """A small real-pixel slide file with its pixel size: a BCCD field as a TIFF."""
    import tifffile

    from pipeline.imaging import read_rgb
    from tests.conftest import BCCD, BCCD_UM_PER_PX

    rgb = read_rgb(sorted((BCCD / "JPEGImages").glob("*.jpg"))[0])
    tifffile.imwrite(path, rgb, resolution=(1e4 / BCCD_UM_PER_PX, 1e4 / BCCD_UM_PER_PX),
                     resolutionunit="CENTIMETER")


def test_a_case_form_left_open_saves_only_its_own_edits(review_env):
    """Two reviewers' forms: the one loaded before the other's save must not wipe the
    accession and patient ID entered meanwhile; a field both edited refuses the save."""
    env = review_env
    tech = client_as(env.cfg, env.store)
    shown = {"was_shown": "1", **{f"was_{k}": "" for k in CASE}}  # both loaded empty
    assert _post_case(tech, env.slide_id, **shown, accession="ACC-0004",
                      patient_id="MRN-4").status_code == 303
    r = _post_case(tech, env.slide_id, **shown, patient_name="Doe, Jane")
    assert r.status_code == 303
    with env.store.session() as s:
        assert s.get(Slide, env.slide_id).case_info == {
            "accession": "ACC-0004", "patient_id": "MRN-4", "patient_name": "Doe, Jane"}
    r = _post_case(tech, env.slide_id, **shown, accession="ACC-9999")
    assert r.status_code == 409 and "Accession changed meanwhile" in r.text
    assert "Changed meanwhile" in r.text  # the page's title, not "Locked"
    with env.store.session() as s:
        assert s.get(Slide, env.slide_id).case_info["accession"] == "ACC-0004"


def test_a_collection_date_in_the_future_is_refused(review_env):
    env = review_env
    tech = client_as(env.cfg, env.store)
    r = _post_case(tech, env.slide_id, collected_on="2099-01-01")
    assert r.status_code == 400 and "Collected: Value error, 2099-01-01 is in the future" in r.text


def test_a_lab_where_only_a_supervisor_signs(review_env, tmp_path):
    """Technicians pre-review and hand the slide on; the queue shows it ready; a supervisor
    signs, and the report names both."""
    env = review_env
    lab = env.cfg.model_copy(update={"review": env.cfg.review.model_copy(update={
        "sign_roles": ["supervisor"]})})
    tech = client_as(lab, env.store)
    page = tech.get(f"/slides/{env.slide_id}").text
    assert 'id="sign">' not in page and "a supervisor signs it off" in page
    assert f'action="/slides/{env.slide_id}/pre-review"' in page
    r = sign_form(tech, env.slide_id)
    assert r.status_code == 403 and "a technician may not sign slides off here" in r.text
    # Handing on makes the checks a sign-off makes: the flags first.
    hand_on = {"csrf_token": tech.token, "note": "2 smudges left in", "all_cells_seen": "true"}
    r = tech.post(f"/slides/{env.slide_id}/pre-review", data=hand_on, follow_redirects=False)
    assert r.status_code == 400 and "did not say which changes the page showed" in r.text
    hand_on["seen"] = seen_of(tech, env.slide_id)
    r = tech.post(f"/slides/{env.slide_id}/pre-review", data=hand_on, follow_redirects=False)
    assert r.status_code == 400 and "not checked yet" in r.text
    check_flags(env.store, env.slide_id)
    hand_on["seen"] = seen_of(tech, env.slide_id)
    r = tech.post(f"/slides/{env.slide_id}/pre-review", data=hand_on, follow_redirects=False)
    assert r.status_code == 303
    row = next(r for r in tech.get("/api/queue").json()["slides"] if r["id"] == env.slide_id)
    assert f"ready for sign-off: pre-reviewed by {TECH[0]}" in row["flags"]
    with env.store.session() as s:
        assert s.get(Slide, env.slide_id).status == "awaiting_review"  # still open
    page = tech.get(f"/slides/{env.slide_id}").text
    assert f"Pre-reviewed by <strong>{TECH[0]}</strong>" in page
    assert "“2 smudges left in” · ready for sign-off" in page
    # A change after the hand-on: the queue and the page say so.
    _post_case(tech, env.slide_id, accession="BM26-00418")
    row = next(r for r in tech.get("/api/queue").json()["slides"] if r["id"] == env.slide_id)
    assert f"pre-reviewed by {TECH[0]}, changed since" in row["flags"]
    assert "changed since</strong>" in tech.get(f"/slides/{env.slide_id}").text

    sup = client_as(lab, env.store, SUPER)
    page = sup.get(f"/slides/{env.slide_id}").text
    assert 'id="sign">' in page and f"pre-reviewed by {TECH[0]}" in page
    # A signer does not pre-review: "pre-reviewed by super, signed by super" reads as two.
    r = sup.post(f"/slides/{env.slide_id}/pre-review", follow_redirects=False,
                 data={"csrf_token": sup.token, "seen": seen_of(sup, env.slide_id)})
    assert r.status_code == 403 and "would read as a second person" in r.text
    assert sign_form(sup, env.slide_id).status_code == 303
    with env.store.session() as s:
        assert s.get(Slide, env.slide_id).signed_by == SUPER[0]
    pdf = tmp_path / "r.pdf"
    write_report(env.store, env.slide_id, lab, "pdf", pdf)
    text = " ".join(" ".join(p.extract_text() for p in PdfReader(pdf).pages).split())
    assert f"pre-reviewed by {TECH[0]} at" in text and "2 smudges left in" in text
    assert f"Signed by {SUPER[0]} at" in text


def test_a_case_field_cannot_run_as_a_spreadsheet_formula(review_env):
    env = review_env
    tech = client_as(env.cfg, env.store)
    _post_case(tech, env.slide_id, patient_name='=HYPERLINK("http://x.example","open")',
               specimen="-aspirate")
    rep = build_report(env.store, env.slide_id, env.cfg)
    rows = {r["label"]: r["value"] for r in csv.DictReader(io.StringIO(report_csv(rep)))
            if r["quantity"] == "CASE"}
    assert rows["patient_name"] == '\'=HYPERLINK("http://x.example","open")'
    assert rows["specimen"] == "'-aspirate"
    assert rep["slide"]["case"]["patient_name"].startswith("=")  # JSON keeps the value
