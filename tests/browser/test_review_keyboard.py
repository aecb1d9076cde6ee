"""Browser: the keys act on the cell the reviewer is on, fast typing is not dropped, nothing
changes before a cell is chosen, and a second reviewer's changes stop a stale sign-off."""

from __future__ import annotations

import re

from playwright.sync_api import Browser, Page, expect
from sqlalchemy import select

from daemon.models import Cell, Slide
from tests.browser.test_review_e2e import _log_in, _row_n, _tile, _total
from tests.review_slide import TECH, TECH2, check_flags

TARGET = "lymphocyte"


def _others(page: Page, cfg):
    return page.locator(", ".join(f'details.cls[data-section="{c}"] figure.cell'
                                  for c in cfg.classes.counted if c != TARGET))


def _reviewed(env, ids) -> dict[int, str | None]:
    with env.store.session() as s:
        return {c.id: c.reviewed_label for c in s.scalars(select(Cell).where(Cell.id.in_(ids)))}


def test_keys_act_on_the_cell_in_view_and_are_not_dropped(page: Page, live):
    base, env = live
    cfg = env.cfg
    check_flags(env.store, env.slide_id)  # fast typing over cells no flag stops (see below)
    key = cfg.classes.get(TARGET).key
    _log_in(page, base, TECH)
    page.goto(f"{base}/slides/{env.slide_id}")
    before_total, n_target = _total(page), _row_n(page, TARGET)

    # Nothing is chosen on load: a stray class key or Backspace changes no cell.
    page.keyboard.press(key)
    page.keyboard.press("Backspace")
    expect(page.locator("#status")).to_have_text("Click a cell or press an arrow key first.")
    assert _total(page) == before_total and _row_n(page, TARGET) == n_target

    # Click one cell, arrow to the next: the key moves the cell the focus is on.
    tiles = _others(page, cfg)
    clicked, nxt = (int(tiles.nth(i).get_attribute("data-id")) for i in range(2))
    page.locator(f'figure.cell[data-id="{clicked}"]').click()
    page.keyboard.press("ArrowRight")
    expect(page.locator("figure.cell.focused")).to_have_attribute("data-id", str(nxt))
    page.keyboard.press(key)
    expect(_tile(page, TARGET, nxt)).to_have_count(1)
    got = _reviewed(env, [clicked, nxt])
    assert got[nxt] == TARGET and got[clicked] != TARGET  # (confirmed if it was flagged)

    # Five presses with no pause: each moves the next cell, none is dropped.
    page.locator(f'figure.cell[data-id="{int(_others(page, cfg).first.get_attribute("data-id"))}"]'
                 ).click()
    ids = [int(_others(page, cfg).nth(i).get_attribute("data-id")) for i in range(5)]
    for _ in range(5):
        page.keyboard.press(key)
    expect(page.locator(f'#table tr[data-class="{TARGET}"] td.n')).to_have_text(
        str(n_target + 6))
    assert set(_reviewed(env, ids).values()) == {TARGET}
    assert _total(page) == before_total


def test_a_change_by_another_reviewer_stops_a_stale_sign_off(page: Page, browser: Browser, live):
    base, env = live
    cfg = env.cfg
    check_flags(env.store, env.slide_id)
    _log_in(page, base, TECH)
    page.goto(f"{base}/slides/{env.slide_id}")
    n_page = _row_n(page, TARGET)

    other = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page2 = other.new_page()
        _log_in(page2, base, TECH2)
        page2.goto(f"{base}/slides/{env.slide_id}")
        page2.locator(f'figure.cell[data-id="{_others(page2, cfg).first.get_attribute("data-id")}"]'
                      ).click()
        page2.keyboard.press(cfg.classes.get(TARGET).key)
        expect(page2.locator("#status")).to_contain_text("Moved to")
    finally:
        other.close()

    # The first reviewer's page says so within a refresh, and signing from it is refused.
    expect(page.locator("#others")).to_contain_text("tech2 made 1 change", timeout=15_000)
    assert _row_n(page, TARGET) == n_page  # the page still shows what it showed
    page.mouse.wheel(0, 20_000)  # deep in the gallery, the notice is still in view
    box = page.locator("#others").bounding_box()
    assert box and 0 <= box["y"] and box["y"] + box["height"] <= 900
    page.check("#all-cells-seen")
    page.click("#sign")
    expect(page.locator("body")).to_contain_text("tech2 made 1 change since this page was loaded")
    with env.store.session() as s:
        assert s.get(Slide, env.slide_id).status == "awaiting_review"

    # After a reload the page shows the change, and signing goes through.
    page.goto(f"{base}/slides/{env.slide_id}")
    assert _row_n(page, TARGET) == n_page + 1
    page.check("#all-cells-seen")
    page.click("#sign")
    expect(page.locator("p.locked")).to_have_text("Signed and locked.")


def test_a_fast_second_key_never_answers_a_flag_unseen(page: Page, live):
    """A cell moved with a double press: the second press would land on the next cell; when
    that one is flagged for review it is dropped (and said so), the flag stays open."""
    base, env = live
    cfg = env.cfg
    key = cfg.classes.get(TARGET).key
    _log_in(page, base, TECH)
    page.goto(f"{base}/slides/{env.slide_id}")
    # A cell outside the target class, not flagged, whose next cell in the gallery is flagged.
    pair = page.evaluate("""() => {
        const all = Array.from(document.querySelectorAll('#gallery figure.cell:not(.dup)'))
            .filter((t) => t.getClientRects().length);
        for (let i = 0; i + 1 < all.length; i++) {
            const a = all[i], b = all[i + 1];
            if (!a.classList.contains('needs-review') && b.classList.contains('needs-review') &&
                a.closest('details').dataset.section !== '%s') return [+a.dataset.id, +b.dataset.id];
        }
        return null; }""" % TARGET)
    assert pair, "no unflagged cell followed by a flagged one on this slide"
    plain, flagged = pair
    page.locator(f'figure.cell[data-id="{plain}"]').click()
    page.keyboard.press(key)
    page.keyboard.press(key)  # meant for the same cell, typed before the answer came
    expect(page.locator("#status")).to_contain_text("1 more key ignored")
    expect(page.locator(f'figure.cell[data-id="{flagged}"]')).to_have_class(
        re.compile("needs-review"))
    assert _reviewed(env, [plain, flagged]) == {plain: TARGET, flagged: None}
