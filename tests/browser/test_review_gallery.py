"""Browser: multi-select and undo, queue refresh, the field viewer and adding a cell."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect
from sqlalchemy import select

from daemon.models import AuditEvent, Cell
from tests.browser.test_review_e2e import _log_in, _row_n, _tile, _total
from tests.review_slide import TECH


def test_multi_select_move_and_undo(page: Page, live, artifacts):
    base, env = live
    cfg = env.cfg
    _log_in(page, base, TECH)
    page.goto(f"{base}/slides/{env.slide_id}")
    target = "lymphocyte"
    others = [c for c in cfg.classes.counted if c != target]
    tiles = page.locator(", ".join(f'details.cls[data-section="{c}"] figure.cell' for c in others))
    assert tiles.count() >= 3
    ids = [int(tiles.nth(i).get_attribute("data-id")) for i in range(3)]
    before_n, before_total = _row_n(page, target), _total(page)

    # Click the first, Ctrl+click the second, Shift+click extends from the last anchor.
    page.locator(f'figure.cell[data-id="{ids[0]}"]').click()
    page.locator(f'figure.cell[data-id="{ids[1]}"]').click(modifiers=["Control"])
    page.locator(f'figure.cell[data-id="{ids[2]}"]').click(modifiers=["Control"])
    expect(page.locator("#selcount")).to_have_text("3 selected")
    page.screenshot(path=artifacts / "10-multiselect.png")
    page.keyboard.press(cfg.classes.get(target).key)
    expect(page.locator("#status")).to_contain_text("3 cells")
    expect(page.locator(f'#table tr[data-class="{target}"] td.n')).to_have_text(str(before_n + 3))
    for i in ids:
        expect(_tile(page, target, i)).to_have_count(1)
    assert _total(page) == before_total

    # One Ctrl+Z puts all three back where they were.
    page.keyboard.press("Control+z")
    expect(page.locator("#status")).to_contain_text("Undid 3 cells")
    expect(page.locator(f'#table tr[data-class="{target}"] td.n')).to_have_text(str(before_n))
    with env.store.session() as s:
        cells = s.scalars(select(Cell).where(Cell.id.in_(ids)))
        assert all(c.reviewed_label is None for c in cells)
        actions = [e.action for e in s.scalars(  # the slide's, not the logins
            select(AuditEvent).where(AuditEvent.slide_id.is_not(None)).order_by(AuditEvent.id))]
    assert actions == ["reclassify"] * 3 + ["undo"] * 3

    # Click on a class button moves the focused cell too.
    page.locator(f'figure.cell[data-id="{ids[0]}"]').click()
    page.click(f'.classbtn[data-label="{target}"]')
    expect(page.locator(f'#table tr[data-class="{target}"] td.n')).to_have_text(str(before_n + 1))


def test_field_viewer_draws_detections_and_adds_a_missed_cell(page: Page, live, artifacts):
    base, env = live
    _log_in(page, base, TECH)
    page.goto(f"{base}/slides/{env.slide_id}")
    before_total = _total(page)
    tile = page.locator("details.cls[open] figure.cell").first
    cid = int(tile.get_attribute("data-id"))
    tile.click()
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(rf"/fields/\d+\?cell={cid}$"))
    img = page.locator("#fieldview img")
    expect(img).to_be_visible()
    # Visible is laid out, not yet decoded: on a loaded machine the pixels come later.
    page.wait_for_function("document.querySelector('#fieldview img').complete")
    assert page.evaluate("document.querySelector('#fieldview img').naturalWidth") == 640
    boxes = page.locator("#overlay g.det")
    assert boxes.count() >= 1
    expect(page.locator(f'#overlay g.det.focus[data-id="{cid}"]')).to_have_count(1)
    page.screenshot(path=artifacts / "20-field.png", full_page=True)

    # Add a missed cell: click on the image, pick a class, save.
    page.click("#add-mode")
    box = img.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.75)
    expect(page.locator("#add-form")).to_be_visible()
    page.select_option("#add-label", "monocyte")
    page.click("#add-save")
    expect(page.locator("#overlay g.det.added.focus")).to_have_count(1)
    page.screenshot(path=artifacts / "21-field-added.png", full_page=True)
    with env.store.session() as s:
        added = s.scalars(select(Cell).where(Cell.added_by == TECH[0])).one()
    assert added.reviewed_label == "monocyte"
    assert abs(added.x - 160) <= 3 and abs(added.y - 360) <= 3  # field pixels, not screen pixels
    page.goto(f"{base}/slides/{env.slide_id}")
    assert _total(page) == before_total + 1
    expect(_tile(page, "monocyte", added.id)).to_have_count(1)


def test_queue_refreshes_while_a_slide_is_acquiring(page: Page, live, artifacts):
    base, env = live
    sid = env.store.create_slide("live slide", "virtual", "", 300, env.cfg.taxonomy)
    env.store.set_status(sid, "acquiring")
    _log_in(page, base, TECH)
    row = page.locator(f'tr[data-slide="{sid}"]')
    expect(row).to_contain_text("acquiring")
    env.store.set_status(sid, "awaiting_review")
    expect(row).to_contain_text("awaiting review", timeout=15_000)  # polled, no reload
    page.screenshot(path=artifacts / "05-queue-refreshed.png")
