// Queue page: poll the queue while any slide is acquiring.
"use strict";
(function () {
  const table = document.getElementById("queue");
  const every = 1000 * parseFloat(table.dataset.refreshS || "5");
  async function refresh() {
    try {
      const resp = await fetch("/api/queue", { credentials: "same-origin", headers: { "X-Poll": "1" } });
      if (resp.status === 401) {
        location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
        return;
      }
      const data = await resp.json();
      document.getElementById("queue-rows").innerHTML = data.rows_html;
      const older = document.getElementById("older-note");
      if (older) { older.querySelector(".n").textContent = data.more; older.hidden = !data.more; }
      document.getElementById("queue-note").textContent = data.acquiring
        ? "Refreshing every " + every / 1000 + " s while slides are acquiring." : "";
    } catch (e) { /* the service may be restarting; try again next time */ }
  }
  // A search's result is a lookup, not a queue to watch: only the queue refreshes itself.
  if (!table.dataset.q) setInterval(refresh, every);
})();
