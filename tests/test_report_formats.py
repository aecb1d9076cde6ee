"""Slide reports (JSON, CSV, PDF) from a store filled with real fields, before and after a
reviewer signs the slide."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import datetime, timezone

import pytest
from pypdf import PdfReader
from sqlalchemy import select
from typer.testing import CliRunner

from daemon.cli import app
from daemon.models import Cell, Field, Review, Slide
from daemon.report import build_report, report_csv, write_report
from daemon.store import Store
from pipeline.errors import ConfigError
from pipeline.stats import differential
from tests.daemon_fixtures import expected_counts, make_field
from tests.review_slide import pipeline_fields, review_env, review_template  # noqa: F401


@pytest.fixture
def filled(tmp_path, config):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url, tmp_path / "data")
    sid = store.create_slide("BM-2024-17", "virtual", "slide.tif", 500, "pbc11")
    store.claim(sid, "scope-1")
    fields = [make_field(i, seed=3, with_image=False) for i in range(8)]
    for f in fields:
        store.commit_field(sid, f)
    store.set_status(sid, "awaiting_review", stopped_because="area_exhausted")
    yield store, sid, fields, url, tmp_path
    store.close()


def test_json_report_is_the_machine_differential(filled, config):
    store, sid, fields, _url, _ = filled
    rep = build_report(store, "BM-2024-17", config)
    want = differential(expected_counts(fields), config.classes, config.stats, machine=True)
    d = rep["differential"]
    assert rep["basis"] == "machine" and rep["review"] is None
    assert d["total"] == want.total == sum(f.n_counted for f in fields)
    assert len(d["classes"]) == len(want.rows)
    for got, w in zip(d["classes"], want.rows):
        assert (got["name"], got["n"]) == (w.name, w.n)
        assert got["pct"] == pytest.approx(w.pct)
        assert got["ci_low_pct"] == pytest.approx(w.ci_low_pct, abs=0.01)
        assert got["ci_high_pct"] == pytest.approx(w.ci_high_pct, abs=0.01)
    assert d["me_ratio"] == pytest.approx(want.me_ratio, abs=1e-3)
    assert rep["slide"]["fields"] == 8 and rep["slide"]["instrument"] == "scope-1"
    assert any(f.startswith(f"target not reached: {want.total} of 500") for f in rep["flags"])
    assert "preliminary: not yet reviewed and signed" in rep["flags"]
    # Whatever the target, 8 cells are no differential: the lab's minimum says so.
    assert (f"only {want.total} cells counted: fewer than the laboratory's minimum of 200 for "
            "a differential (stats.min_reportable_cells)") in rep["flags"]
    lab = config.model_copy(update={"stats": config.stats.model_copy(update={
        "min_reportable_cells": want.total})})
    assert not any(f.startswith("only ") for f in build_report(store, sid, lab)["flags"])
    json.dumps(rep)  # plain data all the way down


def test_every_report_says_whose_it_is_and_what_it_may_be_used_for(filled, config, tmp_path):
    """A clinician reading only the PDF must learn the count's limits (the shipped model was
    trained on peripheral blood, not marrow) and which laboratory issued it."""
    store, sid, *_ = filled
    rep = build_report(store, sid, config)
    assert rep["laboratory"] is None and "not on marrow aspirates" in rep["statement"]
    lab = config.model_copy(update={"review": config.review.model_copy(update={
        "laboratory": "Haematology, St Elsewhere Hospital, Ward Rd 1",
        "report_statement": "Validated 2026-11 for adult marrow aspirates (VAL-17)."})})
    rep = build_report(store, sid, lab)
    rows = {r["quantity"]: r["label"] for r in csv.DictReader(io.StringIO(report_csv(rep)))}
    assert rows["LABORATORY"] == "Haematology, St Elsewhere Hospital, Ward Rd 1"
    assert rows["STATEMENT"] == "Validated 2026-11 for adult marrow aspirates (VAL-17)."
    pdf = tmp_path / "r.pdf"
    write_report(store, sid, lab, "pdf", pdf)
    text = " ".join(p.extract_text() for p in PdfReader(pdf).pages).replace("\n", " ")
    assert text.startswith("Haematology, St Elsewhere Hospital, Ward Rd 1")
    assert "Intended use and limitations: Validated 2026-11 for adult marrow" in text


def test_signed_report_shows_reviewer_and_counts_before_after(filled, config):
    store, sid, _fields, _url, tmp_path = filled
    before = store.reviewed_counts(sid)
    with store.session() as s:
        cell = s.scalars(select(Cell).where(Cell.slide_id == sid, Cell.label == "myelocyte",
                                            Cell.duplicate_of.is_(None))).first()
        cell.reviewed_label = "promyelocyte"
        other = s.scalars(select(Cell).where(Cell.slide_id == sid, Cell.label != "non_leukocyte",
                                             Cell.duplicate_of.is_(None), Cell.id != cell.id)
                          ).first()
        other.excluded, other.exclude_reason = True, "smudged"
        excluded_label = other.label
        # A third cell leaves the count as "not a leukocyte" (a change of class, not an
        # exclusion): the report still says review left two out, not one.
        debris = s.scalars(select(Cell).where(
            Cell.slide_id == sid, Cell.duplicate_of.is_(None),
            Cell.label.not_in(["non_leukocyte", "myelocyte", "promyelocyte", "erythroblast"]),
            Cell.id.not_in([cell.id, other.id]))).first()
        debris.reviewed_label = "non_leukocyte"
        # And a cell the machine missed is added: two out and one in, not "one out".
        s.add(Cell(field_id=cell.field_id, slide_id=sid, index=1000, x=5.0, y=5.0,
                   box=[0, 0, 10, 10], probabilities={}, first_label="lymphocyte",
                   label="lymphocyte", confidence=0.0, guided=False, needs_review=False,
                   reviewed_label="lymphocyte", excluded=False, added_by="tech.anna"))
    after = store.reviewed_counts(sid)
    at = datetime(2026, 11, 26, 9, 30, tzinfo=timezone.utc)
    with store.session() as s:
        s.add(Review(slide_id=sid, username="tech.anna", action="sign", at=at,
                     counts_before=before, counts_after=after,
                     note="dysplastic <neutrophils> & ringed sideroblasts to follow"))
        slide = s.get(Slide, sid)
        slide.status, slide.signed_by, slide.signed_at = "signed", "tech.anna", at
    rep = build_report(store, sid, config)
    assert rep["basis"] == "reviewed"
    rv = rep["review"]
    assert rv["reviewer"] == "tech.anna" and rv["signed_at"].startswith("2026-11-26T09:30")
    assert rv["counts_before"] == before and rv["counts_after"] == after
    d = {c["name"]: c["n"] for c in rep["differential"]["classes"]}
    m = {c["name"]: c["n"] for c in rep["machine_differential"]["classes"]}
    assert d == {k: after.get(k, 0) for k in d}
    assert d["promyelocyte"] == m["promyelocyte"] + 1 - (excluded_label == "promyelocyte")
    assert d["myelocyte"] == m["myelocyte"] - 1 - (excluded_label == "myelocyte")
    machine_total = rep["machine_differential"]["total"]
    assert rep["differential"]["total"] == machine_total - 1
    assert not any(f.startswith("preliminary") for f in rep["flags"])
    assert any(f"review left 2 of the machine's {machine_total} out and added 1)" in f
               for f in rep["flags"]), rep["flags"]
    # `status` shows the machine's count (acquisition progress) and the count review left.
    lab = tmp_path / "lab.yaml"
    lab.write_text(f"store:\n  url: {_url}\n  data_dir: {tmp_path / 'data'}\n")
    res = CliRunner().invoke(app, ["status", "--json", "--config", str(lab)])
    row = json.loads(res.stdout)[0]
    assert (row["counted"], row["reviewed"]) == (machine_total, machine_total - 1)
    res = CliRunner().invoke(app, ["status", "--config", str(lab)])
    assert res.exit_code == 0 and f"{machine_total}/500" in res.stdout, res.output

    pdf = tmp_path / "signed.pdf"
    write_report(store, sid, config, "pdf", pdf)
    text = "\n".join(p.extract_text() for p in PdfReader(pdf).pages)
    assert "BM-2024-17" in text and "tech.anna" in text
    assert "Promyelocyte" in text and "M:E ratio" in text
    assert f"{rep['differential']['me_ratio']:.2f}" in text
    assert "target not reached" in text
    assert "signed by tech.anna" in text  # the sign-off comment, escaped, on the report
    assert "dysplastic <neutrophils> & ringed sideroblasts" in text.replace("\n", " ")


def _adaptive(config, **stats):
    """The fixture's 8 cells with no blast decide a 50% threshold at 95%: an adaptive stop
    that small slide can show (pbc11's blasts are named in review only, so it is the
    reviewed count that decides)."""
    return config.model_copy(update={"stats": config.stats.model_copy(update={
        "blast_thresholds_pct": [50.0], "adaptive_confidence": 0.95, "adaptive_min_cells": 6,
        **stats})})


def test_a_review_that_undecides_an_adaptive_stop_reports_a_short_count(filled, config):
    """The count stopped early because the machine's blast interval decided every threshold;
    reviewers then name a blast and the interval straddles 50%: the signed report must not
    also say the thresholds were decided, and the short count is flagged."""
    store, sid, *_ = filled
    config = _adaptive(config)
    store.set_status(sid, "awaiting_review", stopped_because="adaptive_stop")
    counted = build_report(store, sid, config)["differential"]["total"]
    assert counted == 8
    with store.session() as s:
        cells = s.scalars(select(Cell).where(
            Cell.slide_id == sid, Cell.duplicate_of.is_(None),
            Cell.label.in_(config.classes.counted)).limit(1)).all()
        for c in cells:
            c.reviewed_label = "myeloblast"
        slide = s.get(Slide, sid)
        slide.status, slide.signed_by = "signed", "tech.anna"
        slide.signed_at = datetime(2026, 11, 26, 9, 30, tzinfo=timezone.utc)
    rep = build_report(store, sid, config)
    assert any("straddles 50%" in f for f in rep["flags"]), rep["flags"]
    assert not any(f.startswith("stopped early") for f in rep["flags"])
    short = [f for f in rep["flags"] if f.startswith(f"target not reached: {counted} of 500")]
    assert short and "the reviewed count does not" in short[0]
    # The lab must still read which cell types only a reviewer could have named.
    assert any(f.startswith("the model does not recognise Plasma cell, Other nucleated cell")
               for f in rep["flags"]), rep["flags"]


def test_an_adaptive_stop_is_judged_again_on_the_count_review_left(filled, config):
    """Review leaves cells out of an adaptive stop's count: still enough to decide every
    threshold at the stop's own interval, the report says "stopped early" and what review
    left out; below the stop's minimum count, it is a short count (it had said "stopped
    early" whatever review left, as long as the 95% interval decided)."""
    store, sid, *_ = filled
    config = _adaptive(config)
    store.set_status(sid, "awaiting_review", stopped_because="adaptive_stop")
    with store.session() as s:
        counted = list(s.scalars(select(Cell).where(
            Cell.slide_id == sid, Cell.duplicate_of.is_(None),
            Cell.label.in_(config.classes.counted))))
        assert len(counted) == 8
        counted[0].excluded = True
    rep = build_report(store, sid, config)
    early = [f for f in rep["flags"] if f.startswith("stopped early")]
    assert early == ["stopped early at 8 of 500 cells: every blast threshold was already "
                     "decided (review left 1 of the machine's 8 out; the 7 counted still "
                     "decide them)"], rep["flags"]
    assert not any("target not reached" in f for f in rep["flags"])
    with store.session() as s:
        s.get(Cell, counted[1].id).excluded = True
        s.get(Cell, counted[2].id).excluded = True
    rep = build_report(store, sid, config)  # 5 cells: under the stop's minimum of 6
    assert not any(f.startswith("stopped early") for f in rep["flags"]), rep["flags"]
    short = [f for f in rep["flags"] if f.startswith("target not reached: 5 of 500")]
    assert short and "review left 3 of the machine's 8 out" in short[0]
    queue_flags = _queue_flags(store, sid, config)
    assert "target not reached (5/500)" in queue_flags


def _queue_flags(store, sid, config) -> list[str]:
    from daemon.review.app import create_app
    from tests.review_slide import add_users, client_as

    add_users(store)
    client = client_as(config, store)
    return next(r for r in client.get("/api/queue").json()["slides"] if r["id"] == sid)[
        "flags"]


def test_csv_rows_match_json(filled, config):
    store, sid, *_ = filled
    rep = build_report(store, sid, config)
    text = report_csv(rep)
    assert len({len(r) for r in csv.reader(io.StringIO(text))}) == 1  # no ragged rows
    rows = list(csv.DictReader(io.StringIO(text)))
    by = {r["quantity"]: r for r in rows}
    for c in rep["differential"]["classes"]:
        assert int(by[c["name"]]["n"]) == c["n"]
        # Bounds round outward: the interval printed holds the exact one.
        lo, hi = float(by[c["name"]]["ci_low"]), float(by[c["name"]]["ci_high"])
        assert lo <= c["ci_low_pct"] < lo + 0.01 and hi - 0.01 < c["ci_high_pct"] <= hi
    assert int(by["TOTAL"]["n"]) == rep["differential"]["total"]
    assert by["STATUS"]["label"] == rep["slide"]["status"].replace("_", " ")
    # The coverage of ci_low / ci_high is in the file itself (a lab may not use 95%).
    assert float(by["CONFIDENCE"]["value"]) == rep["differential"]["confidence"] == 0.95
    assert by["CONFIDENCE"]["label"].startswith("95% exact (Clopper–Pearson) intervals")
    # The pixel size counted at is on every report, checked or not (here: the fields').
    with store.session() as sess:
        um = sess.scalars(select(Field.um_per_px)).first()
    assert rep["slide"]["um_per_px"] == um and float(by["PIXEL"]["value"]) == um
    assert by["PIXEL"]["label"].startswith(f"Pixel size {um:.4g} µm/px")
    # Every flag of the report reaches the CSV, which a LIS may read alone.
    assert [r["label"] for r in rows if r["quantity"] == "FLAG"] == rep["flags"]
    assert "target not reached" in " ".join(rep["flags"])
    assert by["M:E"]["label"].startswith("myeloid (Myeloblast, Promyelocyte")
    assert "Monocyte, Lymphocyte, Plasma cell, Other nucleated cell in neither" in by["M:E"]["label"]
    assert float(by["M:E"]["value"]) == round(rep["differential"]["me_ratio"], 3)
    assert int(by["non_leukocyte"]["n"]) == rep["differential"]["not_counted"]["non_leukocyte"]


def test_every_format_rounds_the_exact_value_once(tmp_path, config):
    """6 of 13 cells is 46.1538…%: 46.2 on the PDF (46.15 rounded again gave 46.1), 46.15 in
    JSON and CSV."""
    import dataclasses

    field = make_field(0, with_image=False)
    cell = next(c for c in field.cells if c.label != "non_leukocyte" and c.duplicate_of is None)
    cells = [dataclasses.replace(cell, index=i, x=cell.x + i, duplicate_of=None,
                                 label="eosinophil" if i < 6 else "lymphocyte")
             for i in range(13)]
    with Store(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "data") as store:
        sid = store.create_slide("BM-13", "virtual", "slide.tif", 13, "pbc11")
        store.claim(sid, "scope-1")
        store.commit_field(sid, dataclasses.replace(field, cells=cells))
        store.set_status(sid, "awaiting_review")
        rep, _, text = write_report(store, sid, config, "json", None)
        by = {c["name"]: c for c in json.loads(text)["differential"]["classes"]}
        assert (by["eosinophil"]["pct"], by["lymphocyte"]["pct"]) == (46.15, 53.85)
        rows = {r["quantity"]: r for r in csv.DictReader(io.StringIO(report_csv(rep)))}
        assert (rows["eosinophil"]["value"], rows["lymphocyte"]["value"]) == ("46.15", "53.85")
        write_report(store, sid, config, "pdf", tmp_path / "r.pdf")
    pdf = PdfReader(tmp_path / "r.pdf").pages[0].extract_text()
    assert re.search(r"^Eosinophil\s+\w+\s+6\s+46\.2\s", pdf, re.M), pdf[:1500]
    assert re.search(r"^Lymphocyte\s+\w+\s+7\s+53\.8\s", pdf, re.M), pdf[:1500]


def test_report_command_writes_each_format(filled, tmp_path):
    _store, _sid, _f, url, tmp = filled
    cfg = tmp / "lab.yaml"
    cfg.write_text(f"store:\n  url: {url}\n  data_dir: {tmp / 'data'}\n")
    runner = CliRunner()
    res = runner.invoke(app, ["report", "BM-2024-17", "--format", "json", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["slide"]["name"] == "BM-2024-17"
    out = tmp / "r.csv"
    res = runner.invoke(app, ["report", "BM-2024-17", "-f", "csv", "-o", str(out),
                              "--config", str(cfg)])
    assert res.exit_code == 0 and out.read_text().startswith("slide,quantity")
    pdf = tmp / "r.pdf"
    res = runner.invoke(app, ["report", "1", "-f", "pdf", "-o", str(pdf), "--config", str(cfg)])
    assert res.exit_code == 0 and PdfReader(pdf).pages
    res = runner.invoke(app, ["report", "NOPE", "--config", str(cfg)])
    assert res.exit_code != 0 and "no slide 'NOPE'" in str(res.exception)


def test_reference_intervals_in_every_format(filled, config):
    store, sid, _fields, _url, tmp_path = filled
    plain = build_report(store, sid, config)
    assert all(c["reference_pct"] is None and c["outside"] is None
               for c in plain["differential"]["classes"])
    assert "ref_low" in report_csv(plain).splitlines()[0]
    rows = {c["name"]: c for c in plain["differential"]["classes"]}
    high = max(rows.values(), key=lambda c: c["pct"])  # the commonest class, set above range
    me = plain["differential"]["me_ratio"]
    lab = config.model_copy(update={"stats": config.stats.model_copy(update={
        "reference_intervals": {high["name"]: (0.0, high["pct"] / 2),
                                "me_ratio": (me * 2, me * 4)}})})
    rep = build_report(store, sid, lab)
    d = rep["differential"]
    got = {c["name"]: c for c in d["classes"]}
    assert got[high["name"]]["outside"] == "H"
    assert got[high["name"]]["reference_pct"] == [0.0, high["pct"] / 2]
    assert d["me_outside"] == "L" and d["me_reference"] == [me * 2, me * 4]
    assert [c["n"] for c in d["classes"]] == [c["n"] for c in plain["differential"]["classes"]]

    by = {r["quantity"]: r for r in csv.DictReader(io.StringIO(report_csv(rep)))}
    assert by[high["name"]]["outside"] == "H"
    assert float(by[high["name"]]["ref_high"]) == pytest.approx(high["pct"] / 2)
    assert by["M:E"]["outside"] == "L"
    other = next(n for n in got if n != high["name"])
    assert by[other]["ref_low"] == by[other]["outside"] == ""

    pdf = tmp_path / "ref.pdf"
    write_report(store, sid, lab, "pdf", pdf)
    text = "\n".join(p.extract_text() for p in PdfReader(pdf).pages)
    assert "Reference (%)" in text and f"0 – {high['pct'] / 2:g}" in text
    assert f"reference {me * 2:g} – {me * 4:g} L" in text
    plain_pdf = tmp_path / "plain.pdf"
    write_report(store, sid, config, "pdf", plain_pdf)
    assert "Reference (%)" not in "\n".join(p.extract_text() for p in PdfReader(plain_pdf).pages)


def test_a_slide_of_a_taxonomy_the_config_lacks_is_not_reported_under_another(filled, config):
    store, _sid, fields, _url, _tmp = filled
    other = store.create_slide("BM-2024-18", "virtual", "slide2.tif", 500, "lab12")
    store.claim(other, "scope-1")
    store.commit_field(other, fields[0])
    with pytest.raises(ConfigError, match="taxonomy 'lab12', which this config lacks"):
        build_report(store, "BM-2024-18", config)
    # A slide of a configured taxonomy other than the active one is reported under its own.
    seed10 = config.model_copy(update={"taxonomy": "seed10"})
    rep = build_report(store, "BM-2024-17", seed10)
    assert rep["slide"]["taxonomy"] == "pbc11"
    assert rep["differential"]["total"] == sum(f.n_counted for f in fields)


def test_the_report_follows_the_review_before_signing_and_after_a_reopen(review_env, tmp_path):
    """A report printed mid-review shows the counts the review page shows, and a reopened
    slide's report names the last signature, not the reopening, as the review."""
    from daemon.review import actions

    env = review_env
    tech, sup = actions.Reviewer("tech", "technician"), actions.Reviewer("super", "supervisor")
    with env.store.session() as s:
        cell = s.scalars(select(Cell).where(Cell.slide_id == env.slide_id,
                                            Cell.duplicate_of.is_(None),
                                            Cell.label != "monocyte")).first()
        actions.reclassify(s, env.slide_id, [cell.id], "monocyte", tech,
                           {env.cfg.taxonomy: env.cfg.classes})
        page = actions.reviewed_counts(s, env.slide_id)
    rep = build_report(env.store, env.slide_id, env.cfg)
    got = {c["name"]: c["n"] for c in rep["differential"]["classes"]}
    assert rep["basis"] == "review in progress"
    assert got["monocyte"] == page["monocyte"] == {
        c["name"]: c["n"] for c in rep["machine_differential"]["classes"]}["monocyte"] + 1
    assert "preliminary: review in progress, not signed" in rep["flags"]
    assert rep["review"]["signed"] is False and rep["review"]["reviewer"] is None

    with env.store.session() as s:
        signed = actions.sign(s, env.slide_id, tech, "checked").at
    with env.store.session() as s:
        actions.reopen(s, env.slide_id, sup, "eosinophils look over-called")
    rep = build_report(env.store, env.slide_id, env.cfg)
    rv = rep["review"]
    assert rep["basis"] == "review in progress" and rv["signed"] is False
    assert rv["reviewer"] == "tech" and rv["signed_at"].startswith(
        signed.isoformat(timespec="seconds")[:19])
    assert [h["action"] for h in rv["history"]] == ["sign", "reopen"]
    assert {c["name"]: c["n"] for c in rep["differential"]["classes"]}["monocyte"] == got[
        "monocyte"]
    write_report(env.store, env.slide_id, env.cfg, "pdf", tmp_path / "reopened.pdf")
    text = " ".join(" ".join(p.extract_text() for p in PdfReader(tmp_path / "reopened.pdf")
                             .pages).split())
    assert "Not signed: reopened after tech signed it" in text
    assert "reopened by super" in text and "eosinophils look over-called" in text
    assert "Signed by super" not in text and "Reviewed by super" not in text


def test_a_slide_reopened_without_changes_is_in_review_not_unreviewed(review_env):
    from daemon.review import actions

    env = review_env
    with env.store.session() as s:
        actions.sign(s, env.slide_id, actions.Reviewer("tech", "technician"), None)
    with env.store.session() as s:
        actions.reopen(s, env.slide_id, actions.Reviewer("super", "supervisor"), "recheck")
    rep = build_report(env.store, env.slide_id, env.cfg)
    assert rep["basis"] == "review in progress"
    assert "preliminary: review in progress, not signed" in rep["flags"]
    assert rep["review"]["reviewer"] == "tech" and rep["review"]["signed"] is False
