// Field viewer: focus a detection, add a cell the machine missed.
"use strict";
(function () {
  const cfgEl = document.getElementById("field-config");
  if (!cfgEl) return;
  const cfg = JSON.parse(cfgEl.textContent);
  // Esc: cancels adding a cell, else back to the slide page at the cell this view showed.
  document.addEventListener("keydown", (ev) => {
    if (ev.key !== "Escape" || ev.target.closest("input, select, textarea")) return;
    const cancel = document.getElementById("add-cancel");
    const view = document.getElementById("fieldview");
    if (cancel && view && view.classList.contains("adding")) { cancel.click(); return; }
    location.href = document.getElementById("back-to-slide").href;
  });
  const view = document.getElementById("fieldview");
  const svg = document.getElementById("overlay");
  const modeBtn = document.getElementById("add-mode");
  if (!svg || !modeBtn || cfg.locked) return;
  const form = document.getElementById("add-form");
  const hint = document.getElementById("add-hint");
  let adding = false, at = null, marker = null;

  function setMode(on) {
    adding = on;
    view.classList.toggle("adding", on);
    modeBtn.hidden = on;
    hint.textContent = on ? "Click the centre of the missed cell." : "";
    if (!on) { form.hidden = true; at = null; if (marker) { marker.remove(); marker = null; } }
  }
  modeBtn.addEventListener("click", () => setMode(true));
  document.getElementById("add-cancel").addEventListener("click", () => setMode(false));
  svg.addEventListener("click", (ev) => {
    if (!adding) return;
    const pt = svg.createSVGPoint();
    pt.x = ev.clientX; pt.y = ev.clientY;
    const p = pt.matrixTransform(svg.getScreenCTM().inverse());
    at = { x: Math.round(p.x), y: Math.round(p.y) };
    if (!marker) {
      marker = document.createElementNS("http://www.w3.org/2000/svg", "circle");
      marker.setAttribute("class", "marker");
      marker.setAttribute("r", "25");
      svg.appendChild(marker);
    }
    marker.setAttribute("cx", at.x); marker.setAttribute("cy", at.y);
    document.getElementById("add-at").textContent = "(" + at.x + ", " + at.y + ")";
    form.hidden = false;
    hint.textContent = "";
  });
  document.getElementById("add-save").addEventListener("click", async () => {
    if (!at) return;
    try {
      const data = await marrow.post("/api/slides/" + cfg.slide + "/cells", {
        field_id: cfg.field, x: at.x, y: at.y, label: document.getElementById("add-label").value,
      });
      location.href = "/slides/" + cfg.slide + "/fields/" + cfg.field + "?cell=" + data.changed[0].id;
    } catch (e) {
      hint.textContent = e.message;
    }
  });
})();
