"""The queue lists every open slide and the most recently signed ones; any slide, however
old, is found by its name or its case (accession, patient, specimen). Counts come from the
slide counted by the real pipeline (tests.review_slide)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import update

from daemon.case import CaseInfo
from daemon.models import Slide
from daemon.review.app import SIGNED_SHOWN
from tests.review_slide import (  # noqa: F401  (fixtures)
    SLIDE_NAME,
    client_as,
    pipeline_fields,
    review_env,
    review_template,
)


def _signed_slides(env, n: int) -> list[str]:
    """``n`` signed slides, signed a day apart (the first longest ago), each with a case."""
    names = []
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    for i in range(n):
        name = f"BM25-{i:04d}"
        case = CaseInfo(accession=f"ACC-{i:04d}", patient_id=f"MRN {9000 + i}",
                        patient_name="Doe, Jane" if i == 0 else f"Roe, Rick {i}",
                        specimen="bone marrow aspirate")
        sid = env.store.create_slide(name, "folder", "", 300, env.cfg.taxonomy, case=case)
        with env.store.session() as s:
            s.execute(update(Slide).where(Slide.id == sid).values(
                status="signed", signed_by="super", signed_at=start + timedelta(days=i)))
        names.append(name)
    return names


def test_old_signed_slides_are_found_by_search(review_env):
    env = review_env
    names = _signed_slides(env, SIGNED_SHOWN + 3)
    tech = client_as(env.cfg, env.store)

    listed = {r["name"] for r in tech.get("/api/queue").json()["slides"]}
    assert SLIDE_NAME in listed  # awaiting review: always listed
    assert listed - {SLIDE_NAME} == set(names[3:])  # the 50 signed most recently
    page = tech.get("/").text
    assert '<span class="n">3</span> older signed slide(s) not listed' in page
    assert 'id="search"' in page
    assert tech.get("/api/queue").json()["more"] == 3

    # The oldest, by accession, by patient name words in any order and case, by name.
    for q in ("ACC-0000", "jane DOE", "bm25-0000"):
        r = tech.get("/api/queue", params={"q": q}).json()
        assert [s["name"] for s in r["slides"]] == ["BM25-0000"], q
    page = tech.get("/", params={"q": "Doe, Jane"}).text
    assert "1 slide matching “Doe, Jane”" in page and "BM25-0000" in page
    assert "BM25-0001" not in page and 'id="older-note"' not in page

    # A word that is in every case: all of them, and the slide being reviewed is not.
    r = tech.get("/api/queue", params={"q": "aspirate"}).json()
    assert len(r["slides"]) == len(names) and r["more"] == 0
    # Empty case fields are not text: "none" finds nothing.
    assert tech.get("/api/queue", params={"q": "none"}).json()["slides"] == []
    assert "No slide matches “none”" in tech.get("/", params={"q": "none"}).text

    # The slide under review, found by name, with its counts as the queue shows them.
    row = tech.get("/api/queue", params={"q": "bccd review"}).json()["slides"]
    full = next(s for s in tech.get("/api/queue").json()["slides"] if s["name"] == SLIDE_NAME)
    assert row == [full] and full["counted"] > 0


def test_a_failed_slide_leaves_the_queue_after_a_while_and_search_finds_it(review_env):
    """Failed slides (no result; cancelled ones too) had stayed in the queue for ever."""
    env = review_env
    now = datetime.now(timezone.utc)
    ids = {}
    for name, days in (("BM-failed-today", 0), ("BM-failed-long-ago", 20)):
        ids[name] = env.store.create_slide(name, "folder", "", 300, env.cfg.taxonomy)
        with env.store.session() as s:
            s.execute(update(Slide).where(Slide.id == ids[name]).values(
                status="failed", error="glass broken", finished_at=now - timedelta(days=days)))
    tech = client_as(env.cfg, env.store)
    listed = {r["name"] for r in tech.get("/api/queue").json()["slides"]}
    assert env.cfg.review.failed_shown_days == 14
    assert {SLIDE_NAME, "BM-failed-today"} <= listed and "BM-failed-long-ago" not in listed
    found = tech.get("/api/queue", params={"q": "long-ago"}).json()["slides"]
    assert [(r["name"], r["status"]) for r in found] == [("BM-failed-long-ago", "failed")]
    # Cancelled today after 20 days awaiting review: it keeps when counting ended, and
    # stays in the queue for the days after the cancel.
    from daemon.service import cancel_slide

    waited = env.store.create_slide("BM-waited-long", "folder", "", 300, env.cfg.taxonomy)
    env.store.set_status(waited, "acquiring")
    env.store.set_status(waited, "awaiting_review")
    with env.store.session() as s:
        s.execute(update(Slide).where(Slide.id == waited).values(
            finished_at=now - timedelta(days=20)))
    cancel_slide(env.store, waited, "super", "wrong glass")
    listed = {r["name"] for r in tech.get("/api/queue").json()["slides"]}
    assert "BM-waited-long" in listed  # purge-images judges it by the same condition
