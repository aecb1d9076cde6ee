"""End to end in headless Debian chromium: log in, review a pipeline-counted slide, sign, report."""

from __future__ import annotations

import io
import re
from pathlib import Path

from playwright.sync_api import Page, expect
from sqlalchemy import func, select

from daemon.models import AuditEvent, Cell, Slide
from tests.review_slide import SUPER, TECH

TARGET = "myelocyte"  # key "2" in the default taxonomy


def _n(page: Page, section: str) -> int:
    return page.locator(f'details.cls[data-section="{section}"] figure.cell').count()


def _row_n(page: Page, cls: str) -> int:
    return int(page.locator(f'#table tr[data-class="{cls}"] td.n').inner_text())


def _tile(page: Page, section: str, cell_id: int):
    """The cell's tile if it sits in gallery section ``section``."""
    return page.locator(f'details.cls[data-section="{section}"] figure.cell[data-id="{cell_id}"]')


def _n_cell(page: Page, cls: str):
    return page.locator(f'#table tr[data-class="{cls}"] td.n')


def _total(page: Page) -> int:
    return int(page.locator("#total").inner_text())


def _log_in(page: Page, base: str, user: tuple[str, str], shot: Path | None = None) -> None:
    page.goto(base + "/")
    expect(page).to_have_url(re.compile(r"/login\?next=/"))
    if shot is not None:
        page.screenshot(path=shot)
    page.fill('input[name="username"]', user[0])
    page.fill('input[name="password"]', user[1])
    page.click('button[type="submit"]')
    expect(page.locator("h1")).to_have_text("Slides")


def test_review_sign_and_report(page: Page, live, artifacts):
    base, env = live
    cfg = env.cfg
    key = cfg.classes.get(TARGET).key
    counted = [c for c in cfg.classes.counted if c != TARGET]

    _log_in(page, base, TECH, artifacts / "00-login.png")
    page.screenshot(path=artifacts / "01-queue.png", full_page=True)
    page.click("text=BCCD review slide")
    expect(page.locator("#gallery")).to_be_visible()
    page.screenshot(path=artifacts / "02-slide.png", full_page=True)

    before_target, before_total = _row_n(page, TARGET), _total(page)
    assert before_total > 6, "the pipeline counted too few cells for this test"
    pick = ", ".join(f'details.cls[data-section="{c}"] figure.cell' for c in counted)

    # Reclassify five counted cells by keyboard: focus a cell, press the class key.
    moved = []
    for i in range(5):
        tile = page.locator(pick).first
        moved.append(int(tile.get_attribute("data-id")))
        tile.click()
        page.keyboard.press(key)
        expect(page.locator("#status")).to_contain_text("Moved to")
        expect(_tile(page, TARGET, moved[-1])).to_have_count(1)
    expect(_n_cell(page, TARGET)).to_have_text(str(before_target + 5))
    assert _total(page) == before_total  # moved between counted classes

    # Exclude one (a smudge) by keyboard: the total drops by one.
    page.select_option("#exclude-reason", "smudge")
    tile = page.locator(pick).first
    excluded = int(tile.get_attribute("data-id"))
    tile.click()
    page.keyboard.press("Delete")
    expect(page.locator("#total")).to_have_text(str(before_total - 1))
    expect(_tile(page, "_excluded", excluded)).to_have_count(1)
    page.screenshot(path=artifacts / "03-reviewed.png", full_page=True)

    # The table after a reload is the one the browser showed (the server kept every change).
    page.reload()
    assert _row_n(page, TARGET) == before_target + 5 and _total(page) == before_total - 1
    with env.store.session() as s:
        assert s.scalar(select(func.count()).select_from(AuditEvent)
                        .where(AuditEvent.action.in_(("reclassify", "exclude")))) == 6
        cells = s.scalars(select(Cell).where(Cell.id.in_(moved)))
        assert {c.reviewed_label for c in cells} == {TARGET}

    # The case, typed key by key into the form (a class key typed there moves no cell).
    accession = f"BM26-{key}{key}7"
    page.locator('#case-form input[name="accession"]').press_sequentially(accession)
    page.locator('#case-form input[name="specimen"]').press_sequentially(
        f"aspirate {key} left PSIS")
    page.click("#case-save")
    expect(page.locator('#case-form input[name="accession"]')).to_have_value(accession)
    assert _row_n(page, TARGET) == before_target + 5 and _total(page) == before_total - 1

    # Flagged cells first: signing is refused while any is unchecked; "?" goes to the next
    # one and its own class key confirms it (the counts do not move).
    open_flags = int(page.locator("#flags-open .n").inner_text())
    assert open_flags > 0, "the pipeline flagged no cell on this slide"
    page.click("#sign")  # refused on the page, which stays (and goes to the first flag)
    expect(page.locator("#status")).to_contain_text(
        f"{open_flags} flagged cell{'s are' if open_flags > 1 else ' is'} not checked yet")
    expect(page.locator("#slide-status")).to_have_text("awaiting review")
    keys = {c.name: c.key for c in cfg.classes.classes}
    page.keyboard.press("?")
    for n in range(open_flags, 0, -1):
        # After each check the next flagged cell is in focus without another "?".
        expect(page.locator("#flags-open .n")).to_have_text(str(n))
        expect(page.locator("#next-flag .n")).to_have_text(str(n))
        focused = page.locator("figure.cell.focused")
        expect(focused).to_have_count(1)
        expect(focused).to_have_class(re.compile("needs-review"))
        section = focused.evaluate("t => t.closest('details').dataset.section")
        page.keyboard.press(keys[section])
        expect(page.locator("#status")).to_contain_text("Confirmed as")
    expect(page.locator("#flags-open")).to_be_hidden()
    expect(page.locator("#next-flag")).to_be_hidden()
    assert _row_n(page, TARGET) == before_target + 5 and _total(page) == before_total - 1
    with env.store.session() as s:
        assert s.scalar(select(func.count()).select_from(AuditEvent)
                        .where(AuditEvent.action == "confirm")) == open_flags

    # A case typed but not saved stops the sign-off (it would be lost, then locked).
    pid = page.locator('#case-form input[name="patient_id"]')
    pid.fill("MRN 77")
    page.click("#sign")
    expect(page.locator("#status")).to_contain_text("The case has changes not saved")
    expect(page.locator("#slide-status")).to_have_text("awaiting review")
    pid.fill("")

    # Sign: pbc11's blasts are named by review only, so the signer says every counted cell
    # was looked at; without the tick the page refuses.
    page.click("#sign")
    expect(page.locator("#status")).to_contain_text("tick that you looked at every counted")
    expect(page.locator("#slide-status")).to_have_text("awaiting review")
    page.check("#all-cells-seen")
    page.click("#sign")
    expect(page.locator("p.locked")).to_have_text("Signed and locked.")
    expect(page.locator("#slide-status")).to_have_text("signed")
    page.screenshot(path=artifacts / "04-signed.png", full_page=True)

    # Download the PDF report and check its counts.
    with page.expect_download() as dl:
        page.click("#report-pdf")
    pdf = dl.value.path().read_bytes()
    (artifacts / "report.pdf").write_bytes(pdf)
    from pypdf import PdfReader

    text = "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages)
    assert re.search(r"Signed by\s+tech\s+at\s+20\d\d-", text), text[-1500:]
    assert re.search(rf"Accession\s+{accession}\s", text), text[:500]
    label = cfg.classes.get(TARGET).label
    row = re.search(rf"^{label}\s+\w+\s+(\d+)\s+[\d.]+\s+[\d.]+ – [\d.]+\s+(\d+)$", text, re.M)
    assert row, text[:2000]
    assert (int(row.group(1)), int(row.group(2))) == (before_target + 5, before_target)
    total = re.search(r"^Total\s+(\d+)\s+[\d.]+\s+(\d+)$", text, re.M)
    assert total and int(total.group(1)) == before_total - 1, text[:2000]
    before_after = re.search(rf"^{label}\s+(\d+)\s+(\d+)$", text, re.M)  # before / after review
    assert before_after and (int(before_after.group(1)), int(before_after.group(2))) == (
        before_target, before_target + 5), text[-1500:]

    # The signed slide refuses changes: no toolbar, keys do nothing, the API answers 409.
    expect(page.locator("#toolbar")).to_have_count(0)
    first = page.locator("figure.cell").first
    first.click()
    page.keyboard.press(key)
    status = page.evaluate(
        """async (id) => {
             const url = location.pathname.replace('/slides/', '/api/slides/') + '/reclassify';
             const r = await fetch(url, {method: 'POST', headers: {
               'Content-Type': 'application/json', 'X-CSRF-Token': marrow.csrf},
               body: JSON.stringify({cells: [id], label: 'monocyte'})});
             return [r.status, (await r.json()).error]; }""",
        int(first.get_attribute("data-id")))
    assert status[0] == 409 and "signed" in status[1]
    with env.store.session() as s:
        assert s.scalar(select(Slide.status).where(Slide.id == env.slide_id)) == "signed"
        assert s.scalar(select(func.count()).select_from(AuditEvent)
                        .where(AuditEvent.action == "reclassify")) == 5
