// Shared by the review pages: the CSRF token and a JSON POST helper.
"use strict";
window.marrow = {
  csrf: document.querySelector('meta[name="csrf-token"]').content,
  async post(url, body, headers) {
    const resp = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": this.csrf, ...headers },
      body: JSON.stringify(body || {}),
      credentials: "same-origin",
    });
    let data = {};
    try { data = await resp.json(); } catch (e) { /* not JSON */ }
    if (resp.status === 401) {  // the session ended: log in again, then back here
      location.href = "/login?expired=1&next=" + encodeURIComponent(location.pathname);
    }
    if (!resp.ok) throw new Error(data.error || (resp.status + " " + resp.statusText));
    return data;
  },
};
