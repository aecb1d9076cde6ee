"""The review flow on PostgreSQL (the store labs share between instruments)."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from daemon.models import AuditEvent, Cell, Review, Slide
from daemon.review.app import create_app
from tests.daemon_fixtures import PG_ENV, _pg_database
from tests.review_slide import (  # noqa: F401  (fixture)
    SLIDE_NAME,
    SUPER,
    TECH,
    add_users,
    check_flags,
    count_slide,
    login,
    pipeline_fields,
    sign_form,
)


@pytest.mark.postgres
def test_review_sign_and_reopen_on_postgresql(pipeline_fields, tmp_path, config):  # noqa: F811
    from daemon.store import Store

    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"PostgreSQL tests need ${PG_ENV} (set by .ci/run, which starts a server)")
    url, drop = _pg_database(base)
    store = Store(url, tmp_path / "data")
    try:
        add_users(store)
        sid = count_slide(store, config, SLIDE_NAME, pipeline_fields)
        flagged = check_flags(store, sid)  # as a reviewer does before signing
        app = create_app(config, store)
        tech, sup = TestClient(app), TestClient(app)
        tech.headers["X-CSRF-Token"] = ttoken = login(tech, TECH)
        stoken = login(sup, SUPER)
        with store.session() as s:
            cells = [c for c in s.scalars(select(Cell).where(Cell.slide_id == sid,
                                                             Cell.duplicate_of.is_(None)))
                     if c.label in config.classes.counted]
        assert len(cells) >= 3
        total = tech.get(f"/api/slides/{sid}").json()["differential"]["total"]
        a, b, c = cells[:3]
        target = next(n for n in config.classes.counted if n not in {a.label, b.label})
        assert tech.post(f"/api/slides/{sid}/reclassify",
                         json={"cells": [a.id, b.id], "label": target}).status_code == 200
        r = tech.post(f"/api/slides/{sid}/exclude", json={"cells": [c.id], "reason": "duplicate"})
        assert r.json()["total"] == total - 1
        assert tech.post(f"/api/slides/{sid}/undo").json()["total"] == total
        assert sign_form(tech, sid, ttoken).status_code == 303
        assert tech.post(f"/api/slides/{sid}/undo").status_code == 409
        assert tech.post(f"/slides/{sid}/reopen", data={"csrf_token": ttoken, "reason": "x"},
                         follow_redirects=False).status_code == 403
        assert sup.post(f"/slides/{sid}/reopen", data={"csrf_token": stoken, "reason": "recheck"},
                        follow_redirects=False).status_code == 303
        with store.session() as s:
            assert s.get(Slide, sid).status == "awaiting_review"
            actions = [e.action for e in s.scalars(select(AuditEvent).where(
                AuditEvent.slide_id.is_not(None)).order_by(AuditEvent.id))]
            reviews = list(s.scalars(select(Review).order_by(Review.id)))
            assert s.get(Cell, a.id).reviewed_label == target
            assert s.scalar(select(func.count()).select_from(Cell)
                            .where(Cell.excluded.is_(True))) == 0
        assert actions == ["confirm"] * flagged + [
            "reclassify", "reclassify", "exclude", "undo", "sign", "reopen"]
        assert [r.action for r in reviews] == ["sign", "reopen"]
        # The report the signature issued was kept before the reopening, and is withdrawn.
        assert reviews[0].report["issue"]["number"] == 1
        one = tech.get(f"/slides/{sid}/report.json?issue=1").json()
        assert one["superseded"]["reason"] == "recheck"
        assert reviews[0].counts_after[target] == reviews[0].counts_before.get(target, 0) + 2
        pdf = tech.get(f"/slides/{sid}/report.pdf")
        assert pdf.status_code == 200 and pdf.content[:5] == b"%PDF-"
    finally:
        store.close()
        drop()
