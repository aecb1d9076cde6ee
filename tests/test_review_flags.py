"""Cells the machine flagged for review (low confidence after guidance, or unlike every
trained class) are each checked before sign-off: confirmed with their own class key, moved or
excluded. The slide is counted by the real pipeline on real BCCD fields, where the shipped
model flags about a third of the cells (another camera and stain)."""

from __future__ import annotations

from pypdf import PdfReader
from sqlalchemy import select

from daemon.models import AuditEvent, Cell, Slide
from daemon.report import build_report, issued_report, report_pdf
from daemon.review import actions
from tests.review_slide import (  # noqa: F401  (fixtures)
    TECH,
    client_as,
    pipeline_fields,
    review_env,
    review_template,
    sign_form,
)



def _flagged(env) -> list[Cell]:
    with env.store.session() as s:
        return [c for c in s.scalars(select(Cell).where(Cell.slide_id == env.slide_id)
                                     .order_by(Cell.id)) if c.flag_open]



def test_sign_off_waits_until_every_flagged_cell_is_checked(review_env, tmp_path):
    env = review_env
    tech = client_as(env.cfg, env.store)
    flagged = _flagged(env)
    assert len(flagged) >= 4
    page = tech.get(f"/slides/{env.slide_id}").text
    assert f'id="flags-open" data-required="1"><span class="n">{len(flagged)}</span>' in page
    assert f'<span class="n">{len(flagged)}</span> to check</button>' in page  # toolbar
    assert page.count('class="tag review"') == len(flagged) + 3  # tiles, card, toolbar, keys
    counts = env.store.reviewed_counts(env.slide_id)

    r = sign_form(tech, env.slide_id)
    assert r.status_code == 400
    assert f"{len(flagged)} cells flagged for review are not checked yet" in r.text

    confirm, move, drop, *rest = flagged
    api = f"/api/slides/{env.slide_id}"
    prelim = build_report(env.store, env.slide_id, env.cfg)
    assert prelim["basis"] == "machine"
    report_pdf(prelim, tmp_path / "prelim.pdf")
    text = " ".join(" ".join(p.extract_text() for p in PdfReader(tmp_path / "prelim.pdf")
                             .pages).split())
    n = len(flagged)
    assert f"{n} cells flagged by the machine for review: {n} not checked yet." in text
    r = tech.post(f"{api}/reclassify", json={"cells": [confirm.id], "label": confirm.label})
    # Looked at by a reviewer: the report says so though no count moved.
    assert build_report(env.store, env.slide_id, env.cfg)["basis"] == "review in progress"
    [change] = r.json()["changed"]
    assert change == {"id": confirm.id, "label": confirm.label, "excluded": False,
                      "exclude_reason": None, "changed": False, "flag": "checked"}
    assert env.store.reviewed_counts(env.slide_id) == counts  # a confirmation counts nothing new
    other = next(n for n in env.cfg.classes.counted if n != move.label)
    assert tech.post(f"{api}/reclassify", json={"cells": [move.id], "label": other}
                     ).json()["changed"][0]["flag"] == "checked"
    assert tech.post(f"{api}/exclude", json={"cells": [drop.id], "reason": "smudge"}
                     ).json()["changed"][0]["flag"] == "checked"
    with env.store.session() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.cell_id == confirm.id)).one()
        assert ev.action == "confirm" and ev.username == TECH[0]
        assert (ev.before["reviewed_label"], ev.after["reviewed_label"]) == (None, confirm.label)

    r = sign_form(tech, env.slide_id)
    n = len(rest)
    assert r.status_code == 400 and f"{n} cell{'s' * (n != 1)} flagged for review" in r.text
    page = tech.get(f"/slides/{env.slide_id}").text
    assert f'<span class="n">{n}</span> <span class="noun">flagged cells</span>' in page
    assert 'title="flagged, checked by review">✓' in page
    for c in rest:
        tech.post(f"{api}/reclassify", json={"cells": [c.id], "label": c.label})
    assert _flagged(env) == []
    assert sign_form(tech, env.slide_id).status_code == 303
    with env.store.session() as s:
        assert s.get(Slide, env.slide_id).status == "signed"
    rep = issued_report(env.store, env.slide_id, env.cfg)
    assert rep["slide"]["cells_flagged"] == len(flagged)
    assert rep["slide"]["cells_needing_review"] == 0
    assert rep["review"]["flags_checked"] == len(flagged)
    assert rep["review"]["excluded"] == {"smudge": 1}
    pdf = tmp_path / "signed.pdf"
    report_pdf(rep, pdf)
    text = " ".join(" ".join(p.extract_text() for p in PdfReader(pdf).pages).split())
    assert (f"{len(flagged)} cells flagged by the machine for review: all checked by the "
            "reviewer." in text)
    assert "Left out of the count by review: 1 smudge / broken cell." in text


def test_undo_reopens_a_confirmed_flag_and_an_unflagged_cell_is_not_confirmed(review_env):
    env = review_env
    tech = client_as(env.cfg, env.store)
    api = f"/api/slides/{env.slide_id}"
    cell = _flagged(env)[0]
    tech.post(f"{api}/reclassify", json={"cells": [cell.id], "label": cell.label})
    assert cell.id not in {c.id for c in _flagged(env)}
    [undone] = tech.post(f"{api}/undo").json()["changed"]
    assert undone["id"] == cell.id and undone["flag"] == "open"
    assert cell.id in {c.id for c in _flagged(env)}

    with env.store.session() as s:
        plain = s.scalars(select(Cell).where(Cell.slide_id == env.slide_id,
                                             Cell.needs_review.is_(False),
                                             Cell.duplicate_of.is_(None))).first()
    r = tech.post(f"{api}/reclassify", json={"cells": [plain.id], "label": plain.label})
    assert r.json()["changed"] == []  # nothing to confirm: no event, no change
    with env.store.session() as s:
        assert s.get(Cell, plain.id).reviewed_label is None


def test_a_lab_may_sign_with_flags_open(review_env):
    env = review_env
    lab = env.cfg.model_copy(update={"review": env.cfg.review.model_copy(update={
        "require_flags_checked": False})})
    tech = client_as(lab, env.store)
    n = len(_flagged(env))
    page = tech.get(f"/slides/{env.slide_id}").text
    assert f'id="flags-open" data-required="0"><span class="n">{n}</span>' in page
    assert "to check: confirm" in page and "before signing" not in page
    assert sign_form(tech, env.slide_id).status_code == 303
