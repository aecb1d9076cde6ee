"""Review changes over HTTP on a pipeline-counted slide: counts, audit, undo, add, sign-off."""

from __future__ import annotations

import csv
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from daemon.report import build_report
from daemon.models import AuditEvent, Cell, Count, Field, Review, Slide
from daemon.review.app import create_app
from tests.review_slide import (  # noqa: F401  (fixtures)
    TECH,
    TECH2,
    check_flags,
    login,
    pipeline_fields,
    review_env,
    review_template,
    seen_of,
    sign_form,
)


@pytest.fixture
def tech(review_env):  # noqa: F811
    client = TestClient(create_app(review_env.cfg, review_env.store))
    token = login(client, TECH)
    client.headers["X-CSRF-Token"] = token
    client.token = token
    return client


def _cells(env, **where) -> list[Cell]:
    with env.store.session() as s:
        q = select(Cell).where(Cell.slide_id == env.slide_id).order_by(Cell.id)
        for k, v in where.items():
            q = q.where(getattr(Cell, k) == v)
        return list(s.scalars(q))


def _counted(env) -> list[Cell]:
    tax = env.cfg.classes
    return [c for c in _cells(env, duplicate_of=None, excluded=False)
            if (c.reviewed_label or c.label) in tax.counted]


def _events(env) -> list[AuditEvent]:
    with env.store.session() as s:
        # A slide's events (logins and account changes have none).
        return list(s.scalars(select(AuditEvent).where(AuditEvent.slide_id.is_not(None))
                              .order_by(AuditEvent.id)))


def _api(env, client) -> dict:
    r = client.get(f"/api/slides/{env.slide_id}")
    assert r.status_code == 200
    return r.json()


def test_the_slide_page_shows_the_pipeline_counts(review_env, tech):
    env = review_env
    with env.store.session() as s:
        machine = {c.class_name: c.n for c in s.scalars(select(Count).where(
            Count.slide_id == env.slide_id))}
    counted = _counted(env)
    assert counted, "the pipeline found no leukocytes on the test fields"
    data = _api(env, tech)
    assert data["status"] == "awaiting_review"
    assert data["machine_counts"] == {k: v for k, v in machine.items() if v}
    assert data["differential"]["total"] == len(counted)
    rows = {r["name"]: r for r in data["differential"]["rows"]}
    for name in env.cfg.classes.counted:
        n = sum((c.reviewed_label or c.label) == name for c in counted)
        if name in env.cfg.classes.reviewer_only:  # no row before the review begins
            assert name not in rows and name in data["differential"]["not_reported"]
            continue
        assert rows[name]["n"] == n
        assert rows[name]["ci_low_pct"] <= rows[name]["pct"] <= rows[name]["ci_high_pct"]
    page = tech.get(f"/slides/{env.slide_id}").text
    for c in _cells(env):
        assert f'data-id="{c.id}"' in page
    if machine.get("non_leukocyte"):  # the class's label, as the gallery calls it
        assert "<td>Not a leukocyte (not counted)</td>" in page
    for c in counted:
        if c.needs_review:
            assert "needs-review" in page
        if c.guided:
            assert 'class="tag guided"' in page


def test_reclassify_exclude_and_undo_update_the_counts_with_one_audit_event_each(review_env, tech):
    env = review_env
    counted = _counted(env)
    assert len(counted) >= 3
    a, b, c = counted[:3]
    target = next(n for n in env.cfg.classes.counted
                  if n not in {a.label, b.label, c.label})
    before = _api(env, tech)["differential"]
    n0 = len(_events(env))

    r = tech.post(f"/api/slides/{env.slide_id}/reclassify",
                  json={"cells": [a.id, b.id], "label": target})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {ch["id"] for ch in body["changed"]} == {a.id, b.id}
    assert body["total"] == before["total"]
    after = _api(env, tech)["differential"]
    rows0 = {r["name"]: r["n"] for r in before["rows"]}
    rows1 = {r["name"]: r["n"] for r in after["rows"]}
    assert rows1[target] == rows0.get(target, 0) + 2
    assert f'data-class="{target}"' in body["table_html"]
    events = _events(env)[n0:]
    assert [(e.action, e.username, e.cell_id) for e in events] == [
        ("reclassify", TECH[0], a.id), ("reclassify", TECH[0], b.id)]
    assert events[0].before["label"] == a.label and events[0].after["label"] == target
    assert events[0].after["batch"] == events[1].after["batch"]

    # Moving a cell to the class it already has changes nothing and audits nothing.
    r = tech.post(f"/api/slides/{env.slide_id}/reclassify", json={"cells": [a.id], "label": target})
    assert r.json()["changed"] == [] and len(_events(env)) == n0 + 2

    r = tech.post(f"/api/slides/{env.slide_id}/exclude", json={"cells": [c.id], "reason": "smudge"})
    assert r.status_code == 200 and r.json()["total"] == before["total"] - 1
    ev = _events(env)[-1]
    assert (ev.action, ev.cell_id, ev.before["excluded"], ev.after["exclude_reason"]) == (
        "exclude", c.id, False, "smudge")
    assert len(_events(env)) == n0 + 3

    # Undo reverts the last change (the exclusion), then the two-cell move as one step.
    r = tech.post(f"/api/slides/{env.slide_id}/undo")
    assert [ch["id"] for ch in r.json()["changed"]] == [c.id]
    assert r.json()["total"] == before["total"]
    r = tech.post(f"/api/slides/{env.slide_id}/undo")
    assert {ch["id"] for ch in r.json()["changed"]} == {a.id, b.id}
    assert _api(env, tech)["differential"] == before
    assert [e.action for e in _events(env)[n0 + 3:]] == ["undo"] * 3
    assert tech.post(f"/api/slides/{env.slide_id}/undo").status_code == 400  # nothing left
    with env.store.session() as s:
        assert s.get(Cell, a.id).reviewed_label is None and not s.get(Cell, c.id).excluded


def test_undo_is_per_reviewer(review_env, tech):
    env = review_env
    other = TestClient(tech.app)
    other.headers["X-CSRF-Token"] = login(other, TECH2)
    a, b = _counted(env)[:2]
    tech.post(f"/api/slides/{env.slide_id}/exclude", json={"cells": [a.id], "reason": "smudge"})
    other.post(f"/api/slides/{env.slide_id}/exclude", json={"cells": [b.id], "reason": "duplicate"})
    r = tech.post(f"/api/slides/{env.slide_id}/undo")
    assert [ch["id"] for ch in r.json()["changed"]] == [a.id]
    with env.store.session() as s:
        assert s.get(Cell, b.id).excluded and not s.get(Cell, a.id).excluded


def test_bad_changes_are_refused_and_change_nothing(review_env, tech):
    env = review_env
    a = _counted(env)[0]
    n0 = len(_events(env))
    sid = env.slide_id
    assert tech.post(f"/api/slides/{sid}/reclassify",
                     json={"cells": [a.id], "label": "megakaryocyte"}).status_code == 400
    assert tech.post(f"/api/slides/{sid}/reclassify",
                     json={"cells": [999999], "label": "monocyte"}).status_code == 404
    assert tech.post(f"/api/slides/{sid}/reclassify",
                     json={"cells": [], "label": "monocyte"}).status_code == 422
    assert tech.post(f"/api/slides/{sid}/exclude",
                     json={"cells": [a.id], "reason": "boring"}).status_code == 400
    assert tech.post(f"/api/slides/{sid + 1}/reclassify",
                     json={"cells": [a.id], "label": "monocyte"}).status_code == 404
    # A suppressed duplicate (these BCCD fields gave the pipeline none: one is made so, as
    # the pipeline records it) is not reviewed; its kept cell is.
    kept, dup = _counted(env)[1:3]
    with env.store.session() as s:
        s.get(Cell, dup.id).duplicate_of = kept.index
    r = tech.post(f"/api/slides/{sid}/reclassify", json={"cells": [dup.id], "label": "monocyte"})
    assert r.status_code == 400 and "suppressed duplicate" in r.text
    assert len(_events(env)) == n0


def test_adding_a_missed_cell(review_env, tech):
    env = review_env
    with env.store.session() as s:
        fld = s.scalars(select(Field).where(Field.slide_id == env.slide_id)
                        .order_by(Field.index)).first()
        machine = dict(s.execute(select(Count.class_name, Count.n)
                                 .where(Count.slide_id == env.slide_id)).all())
        found = s.scalars(select(Cell).where(Cell.field_id == fld.id, Cell.added_by.is_(None),
                                             Cell.duplicate_of.is_(None))).all()
    # A spot clear of every detected cell (the machine "missed" a cell there).
    um = fld.um_per_px
    x0, y0 = next((x, y) for y in range(100, 400, 20) for x in range(100, 560, 20)
                  if all(((c.x - x) ** 2 + (c.y - y) ** 2) ** 0.5 * um > 10 for c in found))
    total = _api(env, tech)["differential"]["total"]
    r = tech.post(f"/api/slides/{env.slide_id}/cells",
                  json={"field_id": fld.id, "x": x0, "y": y0, "label": "lymphocyte"})
    assert r.status_code == 200, r.text
    assert r.json()["total"] == total + 1
    cid = r.json()["changed"][0]["id"]
    with env.store.session() as s:
        cell = s.get(Cell, cid)
        assert (cell.added_by, cell.reviewed_label, cell.field_id) == (
            TECH[0], "lymphocyte", fld.id)
        assert dict(s.execute(select(Count.class_name, Count.n)
                              .where(Count.slide_id == env.slide_id)).all()) == machine
    crop = tech.get(f"/images/cells/{cid}")
    assert crop.status_code == 200
    import io

    img = Image.open(io.BytesIO(crop.content))
    assert img.size == (96, 96)
    ev = _events(env)[-1]
    assert (ev.action, ev.cell_id, ev.before, ev.after["x"]) == ("add_cell", cid, None, x0)
    page = tech.get(f"/slides/{env.slide_id}/fields/{fld.id}?cell={cid}").text
    assert f'data-id="{cid}"' in page and "added by tech" in page
    # Outside the field, or on a field of another slide: refused.
    assert tech.post(f"/api/slides/{env.slide_id}/cells", json={
        "field_id": fld.id, "x": 5000, "y": 10, "label": "lymphocyte"}).status_code == 400
    # On a cell already counted (the machine's, or the one just added): refused, so no cell
    # is counted twice.
    # A click inside a cell's box up to 7 µm from its centre (a neutrophil's outer lobe) is
    # that cell too.
    lobe = found[0].x + 6.0 / fld.um_per_px
    assert found[0].box[0] <= lobe <= found[0].box[2]
    for x, y, who in [(found[0].x + 10, found[0].y, f"cell {found[0].id} is counted there"),
                      (lobe, found[0].y, f"cell {found[0].id} is counted there"),
                      (x0 + 2, y0 + 3, f"lymphocyte cell {cid} is counted there")]:
        r = tech.post(f"/api/slides/{env.slide_id}/cells",
                      json={"field_id": fld.id, "x": x, "y": y, "label": "monocyte"})
        assert r.status_code == 400 and who in r.json()["error"], r.text
    assert _api(env, tech)["differential"]["total"] == total + 1
    # Undoing the addition leaves the cell out of the count (its audit trail stays).
    r = tech.post(f"/api/slides/{env.slide_id}/undo")
    assert r.json()["total"] == total and r.json()["changed"][0]["excluded"]


def test_sign_off_locks_the_slide_and_keeps_counts_before_and_after(review_env, tech):
    env = review_env
    check_flags(env.store, env.slide_id)
    a = _counted(env)[0]
    target = next(n for n in env.cfg.classes.counted if n != a.label)
    tech.post(f"/api/slides/{env.slide_id}/reclassify", json={"cells": [a.id], "label": target})
    with env.store.session() as s:
        machine = {k: v for k, v in s.execute(select(Count.class_name, Count.n)
                                              .where(Count.slide_id == env.slide_id)).all() if v}
    r = sign_form(tech, env.slide_id, note="ok")
    assert r.status_code == 303
    with env.store.session() as s:
        slide = s.get(Slide, env.slide_id)
        assert (slide.status, slide.signed_by) == ("signed", TECH[0]) and slide.signed_at
        rev = s.scalars(select(Review).where(Review.slide_id == env.slide_id)).one()
    assert rev.action == "sign" and rev.counts_before == machine
    assert rev.counts_after[target] == machine.get(target, 0) + 1
    assert rev.counts_after.get(a.label, 0) == machine[a.label] - 1
    sign = _events(env)[-1]
    assert sign.action == "sign" and sign.after["role"] == "technician"  # the role signed under
    audit = tech.get(f"/slides/{env.slide_id}/audit").text
    assert "<td>signed</td>" in audit and "<dt>note</dt><dd>ok</dd>" in audit
    assert "<td>confirmed (flagged cell)</td>" in audit  # check_flags above
    n = len(_events(env))
    for url, body in [("reclassify", {"cells": [a.id], "label": a.label}),
                      ("exclude", {"cells": [a.id], "reason": "smudge"}),
                      ("include", {"cells": [a.id]}), ("undo", {})]:
        r = tech.post(f"/api/slides/{env.slide_id}/{url}", json=body)
        assert r.status_code == 409 and "signed" in r.json()["error"], url
    r = tech.post(f"/slides/{env.slide_id}/sign", follow_redirects=False, data={
        "csrf_token": tech.token, "seen": actions_last_event(env)})
    assert r.status_code == 409 and "supervisor must reopen it first" in r.text
    assert len(_events(env)) == n
    page = tech.get(f"/slides/{env.slide_id}").text
    assert "Signed and locked." in page and 'id="toolbar"' not in page
    row = next(r for r in tech.get("/api/queue").json()["slides"] if r["id"] == env.slide_id)
    assert not any("need review" in f for f in row["flags"])  # signing answered them


def test_only_a_slide_awaiting_review_can_be_signed(review_env, tech):
    env = review_env
    sid = env.store.create_slide("still acquiring", "virtual", "", 300, env.cfg.taxonomy)
    env.store.set_status(sid, "acquiring")
    r = tech.post(f"/slides/{sid}/sign", data={"csrf_token": tech.token, "seen": 0})
    assert r.status_code == 409 and "acquiring" in r.text
    queue = tech.get("/api/queue").json()
    assert queue["acquiring"] is True
    rows = {s["name"]: s for s in queue["slides"]}
    assert rows["still acquiring"]["status"] == "acquiring"
    review_row = rows["BCCD review slide"]
    assert review_row["counted"] == len(_counted(env))
    assert any("target not reached" in f for f in review_row["flags"])
    n_review = sum(c.needs_review for c in _cells(env, duplicate_of=None, excluded=False))
    if n_review:
        assert f"{n_review} need review" in review_row["flags"]
    assert "BCCD review slide" in tech.get("/").text
    with env.store.session() as s:
        assert s.scalar(select(func.count()).select_from(Review)) == 0


def test_blast_calls_flag_intervals_that_straddle_a_threshold(review_env):
    """The shipped model does not know blasts (a reviewer-only class): reviewer-called blasts
    drive the blast % and its flags, and the report gives no blast % until review."""
    env = review_env
    lab = env.cfg
    assert "myeloblast" not in lab.classes.model_names
    client = TestClient(create_app(lab, env.store))
    client.headers["X-CSRF-Token"] = login(client, TECH)
    sid = env.slide_id
    rep = build_report(env.store, sid, lab)
    assert rep["basis"] == "machine" and rep["differential"]["blast_pct"] is None
    assert any("does not recognise blasts" in f and "cannot exclude" in f for f in rep["flags"])
    # Nor does the page before the review begins (it showed "0.0%" beside the report's "not
    # reported").
    page = client.get(f"/api/slides/{sid}").json()["differential"]
    assert page["blast_pct"] is None and "myeloblast" in page["not_reported"]
    blasts = _counted(env)[:2]
    r = client.post(f"/api/slides/{sid}/reclassify",
                    json={"cells": [c.id for c in blasts], "label": "myeloblast"})
    assert r.status_code == 200
    d = client.get(f"/api/slides/{sid}").json()["differential"]
    assert d["blast_n"] == 2 and d["blast_pct"] == pytest.approx(200 / d["total"])
    lo, hi = d["blast_ci_pct"]
    straddled = [t for t in lab.stats.blast_thresholds_pct if lo < t < hi]
    assert straddled and len(d["flags"]) == len(straddled)
    assert "straddles" in r.json()["table_html"]
    row = next(s for s in client.get("/api/queue").json()["slides"] if s["id"] == sid)
    assert sum("straddles" in f for f in row["flags"]) == len(straddled)
    page = client.get(f"/slides/{sid}").text
    assert '<kbd>b</kbd> Myeloblast <span class="n">2</span>' in page
    rep = build_report(env.store, sid, lab)
    assert rep["differential"]["blast_n"] == 2 and rep["basis"] == "review in progress"
    # Unsigned, the review may not have reached every blast yet; signed, it has.
    assert any("blast % rests on the review, which is not finished" in f for f in rep["flags"])
    check_flags(env.store, sid)
    r = sign_form(client, sid, client.headers["X-CSRF-Token"])
    assert r.status_code == 303, r.text
    flags = build_report(env.store, sid, lab)["flags"]
    assert any(f.endswith("the signer confirmed every counted cell was looked at for them")
               for f in flags), flags


def test_reference_intervals_follow_the_review(review_env):
    env = review_env
    counted = _counted(env)
    a = counted[0]
    n = sum((c.reviewed_label or c.label) == a.label for c in counted)
    total = len(counted)
    # The cell's class is within its interval only while it still holds all n cells.
    lab = env.cfg.model_copy(update={"stats": env.cfg.stats.model_copy(update={
        "reference_intervals": {a.label: (round(100 * (n - 0.5) / total, 1), 100.0)}})})
    client = TestClient(create_app(lab, env.store))
    client.headers["X-CSRF-Token"] = login(client, TECH)
    page = client.get(f"/slides/{env.slide_id}").text
    assert "Ref. %" in page and 'class="outside"' not in page
    row = {r["name"]: r for r in _api(env, client)["differential"]["rows"]}[a.label]
    assert row["outside"] is None and row["reference"] is not None
    target = next(x for x in env.cfg.classes.counted if x != a.label)
    r = client.post(f"/api/slides/{env.slide_id}/reclassify",
                    json={"cells": [a.id], "label": target})
    assert r.status_code == 200, r.text
    html = r.json()["table_html"]
    cell = html.split(f'data-class="{a.label}"')[1].split("</tr>")[0]
    assert '<b class="outside"' in cell and ">L</b>" in cell
    row = {r["name"]: r for r in _api(env, client)["differential"]["rows"]}[a.label]
    assert row["outside"] == "L"
    # Without intervals the column is not there at all.
    plain = TestClient(create_app(env.cfg, env.store))
    login(plain, TECH)
    page = plain.get(f"/slides/{env.slide_id}").text
    assert f'data-class="{a.label}"' in page and "Ref. %" not in page


def test_a_slide_with_no_counted_cell_is_signed_only_with_a_reason(review_env, tech, tmp_path):
    """Every field skipped by the quality gate: the page and the report say so, and sign-off
    needs a note (no 0.0% differential goes out unexplained)."""
    import dataclasses

    from daemon.report import write_report
    from tests.daemon_fixtures import make_field

    env = review_env
    sid = env.store.create_slide("BLANK-01", "virtual", "blank.tif", 100, env.cfg.taxonomy)
    env.store.set_status(sid, "acquiring")
    for i in range(3):
        env.store.commit_field(sid, dataclasses.replace(
            make_field(i, with_image=False), cells=[], skipped_reason="too few cells"))
    env.store.set_status(sid, "awaiting_review")
    page = tech.get(f"/slides/{sid}").text
    assert "No field was analysed: all 3 were skipped" in page
    r = sign_form(tech, sid)
    assert r.status_code == 400 and "no leukocyte is counted" in r.text
    rep = build_report(env.store, sid, env.cfg)
    assert any(f.startswith("no leukocyte counted") and "all 3 fields were skipped" in f
               for f in rep["flags"])
    r = sign_form(tech, sid, note="aspirate dilute: inadequate")
    assert r.status_code == 303
    write_report(env.store, sid, env.cfg, "pdf", tmp_path / "blank.pdf")
    from pypdf import PdfReader

    text = " ".join(" ".join(p.extract_text() for p in PdfReader(tmp_path / "blank.pdf")
                             .pages).split())
    assert "No field was analysed (3 of 3 skipped)" in text and "not recorded" not in text
    assert "aspirate dilute: inadequate" in text
    # No class is at 0.0% of nothing: a LIS reading the value column imports no result.
    from daemon.report import report_csv

    rep = build_report(env.store, sid, env.cfg)
    rows = {r["quantity"]: r for r in csv.DictReader(io.StringIO(report_csv(rep)))}
    for c in rep["differential"]["classes"]:
        assert c["pct"] is None and rows[c["name"]]["value"] == rows[c["name"]]["ci_low"] == ""
    assert not any("until a reviewer has named them" in f for f in rep["flags"]), rep["flags"]


def test_the_audit_page_lists_every_change_readably(review_env, tech):
    env = review_env
    a = _counted(env)[0]
    target = next(n for n in env.cfg.classes.counted if n != a.label)
    tech.post(f"/api/slides/{env.slide_id}/reclassify", json={"cells": [a.id], "label": target})
    tech.post(f"/api/slides/{env.slide_id}/undo")
    events = _events(env)
    page = tech.get(f"/slides/{env.slide_id}/audit").text
    assert [e.action for e in events] == ["reclassify", "undo"]
    for e in events:
        assert f'<tr id="e{e.id}"><td>{e.id}</td>' in page
    # The undone event is linked; actions and field names in words; the cell links to its
    # field, numbered as the field viewer numbers it.
    assert (f'<dt>undoes event</dt><dd><a href="#e{events[0].id}">#{events[0].id}</a></dd>'
            in page)
    assert "<td>moved</td>" in page and "<td>undid</td>" in page
    assert "<dt>reviewer&#39;s class</dt>" in page and "reviewed_label" not in page
    with env.store.session() as s:
        field_index = s.get(Field, a.field_id).index
    assert (f'<a href="/slides/{env.slide_id}/fields/{a.field_id}?cell={a.id}" '
            f'title="cell {a.id}">#{a.index} in field {field_index}</a>') in page
    # Only what changed, besides the class: a move shows no unchanged "excluded: no".
    assert "<dt>excluded</dt>" not in page
    assert "batch" not in page and '{"' not in page  # no raw JSON, no internal batch ids
    labels = {c.name: c.label for c in env.cfg.classes.classes}
    assert f"<dd>{labels[target]}</dd>" in page and f"<dd>{labels[a.label]}</dd>" in page
    assert "<dd>False</dd>" not in page


def test_a_stale_page_of_the_signer_too_cannot_sign_and_the_note_is_kept(review_env, tech):
    """The same reviewer changed a cell in another window: this page never showed it."""
    env = review_env
    check_flags(env.store, env.slide_id)
    seen = int(seen_of(tech, env.slide_id))
    a = _counted(env)[0]
    target = next(n for n in env.cfg.classes.counted if n != a.label)
    r = tech.post(f"/api/slides/{env.slide_id}/reclassify", json={"cells": [a.id],
                                                                   "label": target},
                  headers={"X-Seen": str(seen)})
    now_seen = r.json()["seen"]  # what the page that made the change has seen
    assert now_seen > seen and r.json()["changed_by_others"] == {}
    r = tech.post(f"/slides/{env.slide_id}/sign", data={
        "csrf_token": tech.token, "seen": seen, "note": "all checked"})
    assert r.status_code == 409 and "you made 1 change in another window" in r.text
    assert "Changed meanwhile" in r.text and "all checked" in r.text  # the note is not lost
    r = tech.post(f"/slides/{env.slide_id}/sign", data={
        "csrf_token": tech.token, "seen": now_seen, "note": "all checked",
        "all_cells_seen": "true"}, follow_redirects=False)
    assert r.status_code == 303


def test_a_sign_off_that_does_not_say_what_its_page_showed_is_refused(review_env, tech):
    """A form without `seen` (an old page, a hand-made request) would skip the changed-
    meanwhile check: it is refused, the slide stays open, and the note comes back."""
    env = review_env
    check_flags(env.store, env.slide_id)
    for url in (f"/slides/{env.slide_id}/sign", f"/slides/{env.slide_id}/pre-review"):
        r = tech.post(url, data={"csrf_token": tech.token, "note": "looked fine"})
        assert r.status_code == 400 and "reload the slide" in r.text, url
        assert "looked fine" in r.text
    with env.store.session() as s:
        assert s.get(Slide, env.slide_id).status == "awaiting_review"
    assert sign_form(tech, env.slide_id).status_code == 303


def test_where_only_review_names_blasts_the_signer_says_every_cell_was_looked_at(review_env,
                                                                              tech):
    """pbc11's model does not recognise blasts: checking the flagged cells alone had signed
    "blasts 0.0% (0.0–0.8%)" over hundreds of cells nobody looked at for blasts. Sign-off
    needs the tick, the audit keeps it, and the signed report says so."""
    env = review_env
    check_flags(env.store, env.slide_id)
    page = tech.get(f"/slides/{env.slide_id}").text
    assert 'id="all-cells-seen"' in page
    r = sign_form(tech, env.slide_id, all_cells_seen="false", note="flags checked")
    assert r.status_code == 400 and "tick that you looked at every counted cell" in r.text
    assert "flags checked" in r.text  # the note comes back
    with env.store.session() as s:
        assert s.get(Slide, env.slide_id).status == "awaiting_review"
    assert sign_form(tech, env.slide_id).status_code == 303
    assert _events(env)[-1].after["all_cells_seen"] is True
    flags = build_report(env.store, env.slide_id, env.cfg)["flags"]
    assert any(f.endswith("the signer confirmed every counted cell was looked at for them")
               for f in flags), flags


def test_a_sign_off_that_did_not_say_every_cell_was_looked_at_is_reported_so(review_env):
    """A slide signed by an older version, or without the taxonomy check: its report does
    not claim what nobody confirmed."""
    from daemon.review import actions

    env = review_env
    with env.store.session() as s:
        actions.sign(s, env.slide_id, actions.Reviewer(TECH[0], "technician"))
    flags = build_report(env.store, env.slide_id, env.cfg)["flags"]
    assert any(f.endswith("the sign-off does not record that every counted cell was looked "
                          "at for them") for f in flags), flags


def test_a_change_from_a_stale_page_reports_what_that_page_missed(review_env, tech):
    """Window B changes a cell; window A (loaded before) then changes another: A is told of
    B's change (its own user's, in another window) and its `seen` must not move past it."""
    env = review_env
    seen = actions_last_event(env)
    a, b = _counted(env)[:2]
    target = next(n for n in env.cfg.classes.counted if n not in {a.label, b.label})
    rb = tech.post(f"/api/slides/{env.slide_id}/reclassify", json={"cells": [a.id],
                                                                    "label": target},
                   headers={"X-Seen": str(seen)})
    assert rb.json()["changed_by_others"] == {}
    ra = tech.post(f"/api/slides/{env.slide_id}/reclassify", json={"cells": [b.id],
                                                                    "label": target},
                   headers={"X-Seen": str(seen)})
    assert ra.json()["changed_by_others"] == {TECH[0]: 1}  # B's change, unseen by A
    r = tech.post(f"/slides/{env.slide_id}/sign", data={"csrf_token": tech.token,
                                                       "seen": seen})
    assert r.status_code == 409 and "you made 2 changes in another window" in r.text


def actions_last_event(env) -> int:
    from daemon.review import actions

    with env.store.session() as s:
        return actions.last_event(s, env.slide_id)


def test_a_slide_with_no_erythroid_cell_serves_and_reports_an_infinite_me(review_env, tech):
    """Every erythroblast called something else: M:E is infinite. The page's JSON has no
    infinity in it (the API answered 500: 'Out of range float values are not JSON
    compliant'), and the report marks it."""
    env = review_env
    ery = [c.id for c in _counted(env) if (c.reviewed_label or c.label) == "erythroblast"]
    if ery:
        r = tech.post(f"/api/slides/{env.slide_id}/reclassify",
                      json={"cells": ery, "label": "segmented_neutrophil"})
        assert r.status_code == 200
    d = _api(env, tech)["differential"]
    assert d["erythroid"] == 0 and d["myeloid"] > 0 and d["me_ratio"] is None
    assert d["me_ci"][0] > 0 and d["me_ci"][1] is None and d["me_infinite"]
    rep = build_report(env.store, env.slide_id, env.cfg)
    # JSON has no infinity: a LIS tells this null from "not defined" by me_infinite.
    assert rep["differential"]["me_ratio"] is None and rep["differential"]["me_infinite"]
    assert any(f.startswith("no erythroid cell counted: the M:E ratio is infinite")
               for f in rep["flags"])
