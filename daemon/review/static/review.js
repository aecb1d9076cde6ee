// Slide page: keyboard and mouse review of the cell gallery.
"use strict";
(function () {
  const cfg = JSON.parse(document.getElementById("review-config").textContent);
  const gallery = document.getElementById("gallery");
  const statusEl = document.getElementById("status");
  const selcount = document.getElementById("selcount");
  const api = "/api/slides/" + cfg.slide;
  let focused = null, anchor = null, busy = false;
  // Going through the flags with "?": a change to a flagged cell moves on to the next flag.
  let checking = false;
  // A selection made by a plain click follows the arrow keys (the class key then acts on the
  // cell in view); one built with Space, Ctrl- or Shift-click stays put while you move.
  let pinned = false;
  // Actions asked for while a request is in flight run in turn after it, each on the cells
  // as they are then (fast typing is not dropped), unless a flagged cell comes into focus.
  const pending = [];

  // Cells in collapsed sections are out of keyboard reach until their section is opened.
  const tiles = () => Array.from(gallery.querySelectorAll("figure.cell:not(.dup)"))
    .filter((t) => t.getClientRects().length);
  const selected = () => tiles().filter((t) => t.classList.contains("selected"));
  const section = (key) => gallery.querySelector('.cls[data-section="' + key + '"]');

  let sayTimer = null;
  function say(msg, bad) {
    statusEl.textContent = msg;
    statusEl.classList.toggle("bad", !!bad);
    // The notice goes after a while, and at the next click (it covers the gallery's foot).
    clearTimeout(sayTimer);
    if (msg) sayTimer = setTimeout(() => say(""), bad ? 10000 : 5000);
  }
  // Changes this page has not shown (anyone's, yours in another window too): say so.
  function othersChanged(others) {
    const list = Object.entries(others || {});
    const banner = document.getElementById("others");
    banner.hidden = !list.length;
    if (!list.length) return false;
    const plural = (n) => n + " change" + (n === 1 ? "" : "s");
    banner.querySelector("span").textContent = list.map(([u, n]) =>
      u === cfg.user ? "you made " + plural(n) + " in another window"
                     : u + " made " + plural(n)).join(", ") +
      " to this slide since this page was loaded.";
    return true;
  }
  function updateSelCount() {
    if (!selcount) return;
    const n = selected().length;
    selcount.textContent = n ? n + " selected" : "";
  }
  function focusTile(t, scroll) {
    if (focused) focused.classList.remove("focused");
    focused = t;
    if (!t) return;
    t.classList.add("focused");
    t.focus({ preventScroll: true });
    if (scroll !== false) t.scrollIntoView({ block: "nearest" });
  }
  function toggle(t, on) {
    t.classList.toggle("selected", on === undefined ? !t.classList.contains("selected") : on);
    updateSelCount();
  }
  function clearSel() {
    selected().forEach((t) => t.classList.remove("selected"));
    updateSelCount();
  }
  function targets() {
    const sel = selected();
    return sel.length ? sel : focused ? [focused] : [];
  }
  function columns(t) {
    const grid = t.parentElement;
    return getComputedStyle(grid).gridTemplateColumns.split(" ").length || 1;
  }
  function move(delta) {
    checking = false;
    const all = tiles();
    if (!all.length) return;
    if (!pinned) clearSel();
    let i = focused ? all.indexOf(focused) : -1;
    if (Math.abs(delta) === 1 || i < 0) {
      i = Math.min(all.length - 1, Math.max(0, i + delta));
    } else {
      // Up/down: same column in the next/previous row, across section boundaries.
      const r = focused.getBoundingClientRect(), dir = Math.sign(delta);
      let best = null, bestScore = Infinity;
      for (const t of all) {
        const q = t.getBoundingClientRect();
        const dy = (q.top - r.top) * dir;
        if (dy <= 2) continue;
        const score = dy * 1000 + Math.abs(q.left - r.left);
        if (score < bestScore) { bestScore = score; best = t; }
      }
      if (best) i = all.indexOf(best);
    }
    focusTile(all[i]);
  }
  function updateCounts() {
    gallery.querySelectorAll(".cls").forEach((s) => {
      s.querySelector("h3 .n").textContent = s.querySelectorAll("figure.cell").length;
    });
  }
  function place(tileEl, change) {
    const key = change.excluded ? "_excluded" : change.label;
    let sec = section(key);
    if (!sec) { location.reload(); return; }
    const grid = sec.querySelector(".grid");
    // Keep a section in pipeline order (cell id) so a cell moved back lands where it was.
    const after = Array.from(grid.children).find((t) => +t.dataset.id > change.id);
    grid.insertBefore(tileEl, after || null);
    tileEl.classList.remove("moved");
    void tileEl.offsetWidth;
    tileEl.classList.add("moved");
    // The ✎ mark: a reviewer's class differs from the machine's.
    const tag = tileEl.querySelector(".tag.changed");
    if (change.changed && !tag) {
      const b = document.createElement("b");
      b.className = "tag changed"; b.textContent = "✎"; b.title = "changed by review";
      tileEl.querySelector("figcaption").appendChild(b);
    } else if (!change.changed && tag) {
      tag.remove();
    }
    // The ? mark of a flag not yet checked; ✓ once a reviewer has confirmed, moved or
    // excluded the cell (undo brings the ? back).
    const cap = tileEl.querySelector("figcaption");
    const mark = cap.querySelector(".tag.review, .tag.checked");
    tileEl.classList.toggle("needs-review", change.flag === "open");
    if (mark && change.flag) {
      const open = change.flag === "open";
      mark.className = "tag " + (open ? "review" : "checked");
      mark.textContent = open ? "?" : "✓";
      mark.title = open ? "flagged: needs review" : "flagged, checked by review";
    }
  }
  const openFlags = () => gallery.querySelectorAll("figure.cell.needs-review:not(.dup)").length;
  // The count of flags left, on the sign-off card and in the toolbar (always in view).
  function updateFlags() {
    const n = openFlags();
    const note = document.getElementById("flags-open");
    if (note) {
      note.querySelector(".n").textContent = n;
      note.querySelector(".noun").textContent = n === 1 ? "flagged cell" : "flagged cells";
      note.hidden = !n;
    }
    const btn = document.getElementById("next-flag");
    if (btn) { btn.querySelector(".n").textContent = n; btn.hidden = !n; }
  }
  // The next flagged cell not yet checked, after the focused one (its section opened).
  function nextFlag(from) {
    const all = Array.from(gallery.querySelectorAll("figure.cell.needs-review:not(.dup)"));
    if (!all.length) { say("No flagged cell left to check."); return; }
    const order = Array.from(gallery.querySelectorAll("figure.cell"));
    // ``from``: the focused cell itself may be the next (it took the changed one's place).
    const at = focused ? order.indexOf(focused) - (from ? 1 : 0) : -1;
    const t = all.find((x) => order.indexOf(x) > at) || all[0];
    checking = true;
    const sec = t.closest("details");
    if (sec) sec.open = true;
    if (!pinned) clearSel();
    focusTile(t);
  }
  function apply(data, verb) {
    const all = tiles();
    const ids = new Set(data.changed.map((c) => c.id));
    let extra = "";
    // Focus moves on to the next cell that was not part of the change.
    let next = null;
    const wasFlag = checking && focused && focused.classList.contains("needs-review");
    if (focused && ids.has(+focused.dataset.id)) {
      const i = all.indexOf(focused);
      next = all.slice(i + 1).find((t) => !ids.has(+t.dataset.id)) ||
             all.slice(0, i).reverse().find((t) => !ids.has(+t.dataset.id)) || null;
    }
    for (const c of data.changed) {
      const t = gallery.querySelector('figure.cell[data-id="' + c.id + '"]');
      if (t) { t.classList.remove("selected"); place(t, c); }
      else location.reload();
    }
    document.getElementById("table").innerHTML = data.table_html;
    updateCounts();
    updateFlags();
    updateSelCount();
    if (verb === "Undid" && data.changed.length) {
      // Back to the cell the undo changed, so its restored state is in view.
      next = gallery.querySelector('figure.cell[data-id="' + data.changed[0].id + '"]');
      const sec = next && next.closest("details");
      if (sec) sec.open = true;
    } else {
      // Keys typed meanwhile were meant for the cell just changed. Where the next cell in
      // focus is a flagged one (or flags are being checked with "?"), they are dropped (an
      // undo is kept): no flag is answered before someone has looked at its cell.
      const onFlag = next && next.classList.contains("needs-review");
      if (wasFlag || onFlag) {
        const dropped = pending.filter((f) => !f.isUndo);
        pending.splice(0, pending.length, ...pending.filter((f) => f.isUndo));
        if (dropped.length) extra = " · " + dropped.length + " more key" +
          (dropped.length === 1 ? "" : "s") + " ignored: look at the next cell first";
      }
      if (wasFlag && next && openFlags()) {  // on to the next flag, not the neighbour
        focusTile(next, false);
        nextFlag(true);
        next = null;
      }
    }
    if (next) focusTile(next);
    const n = data.changed.length;
    say(n ? verb + " " + n + " cell" + (n === 1 ? "" : "s") + " · " + data.total + " counted" + extra
          : "No change.");
  }
  async function send(path, body, verb) {
    busy = true;
    try {
      const data = await marrow.post(api + path, body, { "X-Seen": String(cfg.seen) });
      apply(data, verb);
      // This page has now seen its own change; someone else's keeps it behind (sign refused).
      if (!othersChanged(data.changed_by_others)) {
        cfg.seen = data.seen;
        const input = document.querySelector('#sign-form input[name="seen"]');
        if (input) input.value = data.seen;
      }
    } catch (e) {
      pending.length = 0;  // what was typed after a refused change is not applied blindly
      say(e.message, true);
    } finally {
      busy = false;
    }
    drain();
  }
  // An action that sends nothing ("Select a cell first.") must not leave the rest waiting.
  function drain() {
    while (!busy && pending.length) pending.shift()();
  }
  function run(action) {
    if (busy) { pending.push(action); return; }
    action();
    drain();
  }
  function reclassify(label) {
    const ts = targets();
    if (!ts.length) { say("Select a cell first.", true); return; }
    // Put into the class it already has: a flagged cell is confirmed.
    const same = ts.every((t) => t.closest(".cls").dataset.section === label);
    send("/reclassify", { cells: ts.map((t) => +t.dataset.id), label: label },
         (same ? "Confirmed as " : "Moved to ") + (cfg.labels[label] || label) + ":");
  }
  function exclude() {
    const ts = targets();
    if (!ts.length) { say("Select a cell first.", true); return; }
    const select = document.getElementById("exclude-reason");
    send("/exclude", { cells: ts.map((t) => +t.dataset.id), reason: select.value },
         "Excluded (" + select.selectedOptions[0].textContent.toLowerCase() + ")");
  }
  function include() {
    const ts = targets();
    if (!ts.length) { say("Select a cell first.", true); return; }
    send("/include", { cells: ts.map((t) => +t.dataset.id) }, "Included");
  }
  const undo = () => send("/undo", {}, "Undid");
  undo.isUndo = true;
  // Case fields typed but not saved (compared with what the page showed, was_*).
  function caseUnsaved() {
    const form = document.getElementById("case-form");
    return !!form && Array.from(form.querySelectorAll("input:not([type=hidden])")).some((i) =>
      i.value !== (form.querySelector('input[name="was_' + i.name + '"]') || {}).value);
  }
  let savingCase = false;  // the case form on its way: the page reloads with its values
  const caseForm = document.getElementById("case-form");
  if (caseForm) caseForm.addEventListener("submit", () => { savingCase = true; });
  window.addEventListener("beforeunload", (ev) => {
    if (busy || pending.length || (caseUnsaved() && !savingCase)) {
      ev.preventDefault();
      ev.returnValue = "";
    }
  });

  gallery.addEventListener("click", (ev) => {
    if (statusEl.classList.contains("bad")) say("");
    const t = ev.target.closest("figure.cell");
    if (!t || t.classList.contains("dup")) return;
    checking = false;
    if (ev.shiftKey && anchor) {
      const all = tiles(), a = all.indexOf(anchor), b = all.indexOf(t);
      all.slice(Math.min(a, b), Math.max(a, b) + 1).forEach((x) => toggle(x, true));
      pinned = true;
    } else if (ev.ctrlKey || ev.metaKey) {
      toggle(t);
      anchor = t;
      pinned = true;
    } else {
      clearSel();
      toggle(t, true);
      anchor = t;
      pinned = false;
    }
    focusTile(t, false);
  });
  gallery.addEventListener("dblclick", (ev) => {
    const t = ev.target.closest("figure.cell");
    if (t) location.href = "/slides/" + cfg.slide + "/fields/" + t.dataset.field + "?cell=" + t.dataset.id;
  });

  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest && ev.target.closest("input, select, textarea")) return;
    if (ev.altKey) return;
    const k = ev.key;
    if ((ev.ctrlKey || ev.metaKey) && (k === "z" || k === "Z")) {
      if (!cfg.locked && !ev.repeat) { ev.preventDefault(); run(undo); }
      return;
    }
    if (ev.ctrlKey || ev.metaKey) return;
    switch (k) {
      case "ArrowRight": ev.preventDefault(); move(1); return;
      case "ArrowLeft": ev.preventDefault(); move(-1); return;
      case "ArrowDown": ev.preventDefault(); move(focused ? columns(focused) : 1); return;
      case "ArrowUp": ev.preventDefault(); move(focused ? -columns(focused) : -1); return;
      case " ":
        if (focused) { ev.preventDefault(); toggle(focused); anchor = focused; pinned = true; }
        return;
      case "Escape": clearSel(); pinned = false; return;
      case "Enter":
        if (focused) location.href = "/slides/" + cfg.slide + "/fields/" + focused.dataset.field + "?cell=" + focused.dataset.id;
        return;
    }
    if (cfg.locked) return;
    if (k === "?" && !cfg.keys[k]) { ev.preventDefault(); nextFlag(); return; }
    const label = cfg.keys[k] || cfg.keys[k.toLowerCase()];
    if (k !== "Delete" && !label) return;
    ev.preventDefault();
    if (ev.repeat) return;  // a held key changes one cell, not every cell it would reach
    // A key changes a cell only once the reviewer has chosen one (none is preselected).
    if (!focused && !selected().length && !busy) {
      say("Click a cell or press an arrow key first.", true);
      return;
    }
    run(k === "Delete" ? exclude : () => reclassify(label));
  });

  document.querySelectorAll(".classbtn").forEach((b) =>
    b.addEventListener("click", () => run(() => reclassify(b.dataset.label))));
  const on = (id, fn) => { const el = document.getElementById(id); if (el) el.addEventListener("click", () => run(fn)); };
  on("exclude", exclude);
  on("include", include);
  on("undo", undo);
  const flagBtn = document.getElementById("next-flag");
  if (flagBtn) flagBtn.addEventListener("click", () => nextFlag());
  // A reason chosen with the mouse gives the keys back to the gallery (else arrows would
  // change the reason and Del do nothing); with the keyboard the arrows go on choosing,
  // and Esc or Tab leaves.
  const reasonSel = document.getElementById("exclude-reason");
  if (reasonSel) {
    let byPointer = false;
    const back = () => { reasonSel.blur(); if (focused) focused.focus({ preventScroll: true }); };
    reasonSel.addEventListener("pointerdown", () => { byPointer = true; });
    reasonSel.addEventListener("change", () => { if (byPointer) back(); byPointer = false; });
    reasonSel.addEventListener("keydown", (ev) => {
      byPointer = false;
      if (ev.key === "Escape") { ev.preventDefault(); back(); }
    });
  }

  // Sign-off: refused by the server while flags are open (where the lab requires it) and
  // blind to a case typed but not saved; say so here instead of leaving the page.
  const signForm = document.getElementById("sign-form");
  const seenBox = document.getElementById("all-cells-seen");
  if (signForm) signForm.addEventListener("submit", (ev) => {
    const note = document.getElementById("flags-open");
    const n = openFlags();
    const doing = signForm.action.endsWith("/pre-review") ? "handing it on" : "signing";
    const empty = Array.from(document.querySelectorAll("#case-form input[data-required]"))
      .filter((i) => !i.value.trim());
    if (caseUnsaved()) {
      ev.preventDefault();
      say("The case has changes not saved: press Save case first (or undo them), before " +
          doing + ".", true);
      document.getElementById("case-save").focus();
    } else if (empty.length) {
      ev.preventDefault();
      say("Fill in " + empty.map((i) => i.dataset.required).join(", ") +
          " under Case and save it before " + doing + ".", true);
      empty[0].focus();
    } else if (note && note.dataset.required === "1" && n) {
      ev.preventDefault();
      say(n + (n === 1 ? " flagged cell is" : " flagged cells are") + " not checked yet: " +
          "confirm each with its own class key, move or exclude it, before " + doing + ".",
          true);
      nextFlag(true);
    } else if (seenBox && !seenBox.checked) {
      ev.preventDefault();
      say("The model does not recognise blasts: tick that you looked at every counted cell " +
          "for them, before " + doing + ".", true);
      seenBox.focus();
    }
  });

  // Back from the field viewer: the cell it showed is in view again.
  const back = new URLSearchParams(location.search).get("cell");
  const backTile = back && gallery.querySelector('figure.cell[data-id="' + CSS.escape(back) + '"]');
  if (backTile) {
    const sec = backTile.closest("details");
    if (sec) sec.open = true;
    focusTile(backTile);
  }

  // The session ended (unused too long, or logged out elsewhere): the patient's cells must
  // not stay on an unattended screen.
  function loggedOut() {
    location.href = "/login?expired=1&next=" + encodeURIComponent(location.pathname);
  }

  // While the slide is still acquiring, keep the table current and offer the new cells.
  if (cfg.status === "acquiring") {
    const timer = setInterval(async () => {
      try {
        const resp = await fetch(api, { credentials: "same-origin", headers: { "X-Poll": "1" } });
        if (resp.status === 401) return loggedOut();
        if (!resp.ok) return;
        const data = await resp.json();
        document.getElementById("table").innerHTML = data.table_html;
        if (data.cells !== cfg.cells) {
          statusEl.innerHTML = "";
          const a = document.createElement("a");
          a.href = location.pathname;
          a.textContent = (data.cells - cfg.cells) + " new cells counted: reload to review them";
          statusEl.appendChild(a);
        }
        if (data.status !== "acquiring") clearInterval(timer);
      } catch (e) { /* try again next time */ }
    }, 1000 * cfg.refresh_s);
  }

  // Someone else reviewing the same slide: say so (signing is refused until a reload).
  if (!cfg.locked) {
    const watch = setInterval(async () => {
      try {
        const resp = await fetch(api + "?since=" + cfg.seen,
                                 { credentials: "same-origin", headers: { "X-Poll": "1" } });
        if (resp.status === 401) return loggedOut();
        if (!resp.ok) return;
        const data = await resp.json();
        if (busy || pending.length) return;  // a change of this page's own is on its way
        if (othersChanged(data.changed_by_others) && data.status === "signed") clearInterval(watch);
      } catch (e) { /* try again next time */ }
    }, 1000 * cfg.refresh_s);
  }

  tiles().forEach((t) => t.setAttribute("tabindex", "-1"));
})();
