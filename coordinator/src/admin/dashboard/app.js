// Treaty dashboard: polls the admin listener's JSON API (/api/...) and renders it.
// Everything shown is set with textContent (never parsed as HTML): gids, handlers, endpoints and
// error messages come from clients and participants and are shown as text, never as markup.
"use strict";

const TOKEN_KEY = "treaty.token";
const POLL_MS = 1000;

const $ = (id) => document.getElementById(id);

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

/** A fetch of the API with the bearer token; resolves to the parsed JSON or throws an Error
 * with the server's message and `status`. */
async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const t = token();
  if (t) headers["Authorization"] = "Bearer " + t;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  let body = null;
  try { body = await resp.json(); } catch (_) { body = null; }
  if (!resp.ok) {
    const err = new Error((body && body.error) || resp.statusText || "request failed");
    err.status = resp.status;
    throw err;
  }
  return body;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function showMessage(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "";
  m.hidden = !text;
}

function explain(err) {
  if (err.status === 401) return "Not authenticated: " + err.message + ". Enter a token above.";
  if (err.status === 403) return "Refused: " + err.message + ".";
  return err.message;
}

function age(ms) {
  const s = Math.max(0, Math.floor((Date.now() - ms) / 1000));
  if (s < 120) return s + "s";
  if (s < 7200) return Math.floor(s / 60) + "m";
  if (s < 172800) return Math.floor(s / 3600) + "h";
  return Math.floor(s / 86400) + "d";
}

function time(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "–";
}

// ---- counts ---------------------------------------------------------------------------

async function refreshCounts() {
  try {
    const s = await api("/api/summary");
    for (const k of ["live", "stuck", "begun", "committed", "aborted"]) {
      $("count-" + k).textContent = String(s[k]);
    }
    const r = $("ready");
    r.textContent = s.ready ? "serving" : "not serving";
    r.className = "badge " + (s.ready ? "ok" : "bad");
    return true;
  } catch (err) {
    showMessage(explain(err), true);
    return false;
  }
}

// ---- list -----------------------------------------------------------------------------

let pageToken = "";

function listQuery() {
  const q = new URLSearchParams();
  if ($("f-state").value) q.set("states", $("f-state").value);
  if ($("f-mode").value) q.set("mode", $("f-mode").value);
  if ($("f-stuck").checked) q.set("stuck", "true");
  const age = Number($("f-age").value) || 0;
  if (age > 0) q.set("min_age_ms", String(age * 1000));
  q.set("page_size", "50");
  if (pageToken) q.set("page_token", pageToken);
  return q.toString();
}

function stateTag(t) {
  const td = el("td");
  td.appendChild(el("span", t.state, "tag " + t.state));
  if (t.stuck) {
    td.appendChild(document.createTextNode(" "));
    td.appendChild(el("span", "STUCK", "tag stuck"));
  }
  return td;
}

async function refreshList() {
  let page;
  try {
    page = await api("/api/transactions?" + listQuery());
  } catch (err) {
    showMessage(explain(err), true);
    return;
  }
  const rows = $("tx-rows");
  const fresh = document.createDocumentFragment();
  for (const t of page.transactions) {
    const tr = el("tr", null, t.stuck ? "stuck" : "");
    tr.dataset.gid = t.gid;
    const gid = el("td", null, "gid");
    const a = el("a", t.gid);
    a.href = "#/tx/" + encodeURIComponent(t.gid);
    gid.appendChild(a);
    tr.appendChild(gid);
    tr.appendChild(el("td", t.mode));
    tr.appendChild(stateTag(t));
    tr.appendChild(el("td", t.outcome));
    tr.appendChild(el("td", t.branches.length));
    tr.appendChild(el("td", age(t.created_unix_ms)));
    tr.appendChild(el("td", t.reason, "reason"));
    fresh.appendChild(tr);
  }
  if (page.transactions.length === 0) {
    const tr = el("tr");
    const td = el("td", "No transaction matches.");
    td.colSpan = 7;
    tr.appendChild(td);
    fresh.appendChild(tr);
  }
  rows.replaceChildren(fresh);
  $("list-more").hidden = !page.next_page_token;
  $("next-page").onclick = () => { pageToken = page.next_page_token; refreshList(); };
}

// ---- one transaction ------------------------------------------------------------------

let current = null; // { gid, seen: [{at, text}], last: string }

function fact(dl, name, value) {
  dl.appendChild(el("dt", name));
  dl.appendChild(el("dd", value));
}

function summaryLine(t) {
  return t.state + (t.stuck ? " (stuck)" : "") + ", outcome " + t.outcome + "; branches: " +
    t.branches.map((b) => b.branch_id + " " + b.state).join(", ");
}

async function refreshTx() {
  if (!current) return;
  let t;
  try {
    t = await api("/api/transactions/" + encodeURIComponent(current.gid));
  } catch (err) {
    showMessage(explain(err), true);
    return;
  }
  $("tx-gid").textContent = t.gid;
  const dl = $("tx-facts");
  dl.replaceChildren();
  fact(dl, "state", t.state + (t.stuck ? " — STUCK" : ""));
  dl.lastChild.id = "tx-state";
  fact(dl, "outcome", t.outcome);
  fact(dl, "mode", t.mode);
  fact(dl, "reason", t.reason || "–");
  dl.lastChild.id = "tx-reason";
  fact(dl, "created", time(t.created_unix_ms));
  fact(dl, "updated", time(t.updated_unix_ms));
  fact(dl, "deadline", time(t.deadline_unix_ms));

  const rows = document.createDocumentFragment();
  for (const b of t.branches) {
    const tr = el("tr");
    tr.appendChild(el("td", b.branch_id));
    tr.appendChild(el("td", b.handler));
    tr.appendChild(el("td", b.endpoint));
    tr.appendChild(el("td", b.state));
    tr.appendChild(el("td", b.attempts));
    tr.appendChild(el("td", b.last_error || "–", "error"));
    tr.appendChild(el("td", b.resolution
      ? "by " + b.resolution.operator + " at " + time(b.resolution.unix_ms) + ": " + b.resolution.reason
      : "–"));
    rows.appendChild(tr);
  }
  $("branch-rows").replaceChildren(rows);

  const line = summaryLine(t);
  if (line !== current.last) {
    current.seen.push({ at: Date.now(), text: line });
    current.last = line;
  }
  const events = [{ at: t.created_unix_ms, text: "created (" + t.mode + ", " + t.branches.length + " branches)" }];
  if (t.deadline_unix_ms) events.push({ at: t.deadline_unix_ms, text: "deadline" });
  for (const b of t.branches) {
    if (b.resolution) {
      events.push({ at: b.resolution.unix_ms, text: "branch " + b.branch_id + " resolved by hand by " +
        b.resolution.operator + ": " + b.resolution.reason });
    }
  }
  events.push({ at: t.updated_unix_ms, text: "last recorded change" });
  for (const s of current.seen) events.push({ at: s.at, text: "seen: " + s.text });
  events.sort((a, b) => a.at - b.at);
  const ol = document.createDocumentFragment();
  for (const e of events) ol.appendChild(el("li", time(e.at) + "  " + e.text));
  $("timeline").replaceChildren(ol);
  $("retry").disabled = ["committed", "aborted"].includes(t.state);
}

async function retry() {
  try {
    const r = await api("/api/transactions/" + encodeURIComponent(current.gid) + "/retry", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: "{}",
    });
    showMessage(r.retried > 0
      ? "Retry sent now to " + r.retried + " branch" + (r.retried === 1 ? "" : "es") + "."
      : "Nothing was waiting to be retried.", false);
  } catch (err) {
    showMessage(explain(err), true);
  }
  refreshTx();
}

async function resolve(ev) {
  ev.preventDefault();
  const body = {
    branch_id: Number($("r-branch").value),
    operator: $("r-operator").value,
    reason: $("r-reason").value,
  };
  try {
    await api("/api/transactions/" + encodeURIComponent(current.gid) + "/resolve", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    showMessage("Branch " + body.branch_id + " resolved by hand.", false);
  } catch (err) {
    showMessage(explain(err), true);
  }
  refreshTx();
}

// ---- routing and polling --------------------------------------------------------------

function route() {
  const m = location.hash.match(/^#\/tx\/(.+)$/);
  showMessage("", false);
  if (m) {
    const gid = decodeURIComponent(m[1]);
    current = { gid, seen: [], last: "" };
    $("list-view").hidden = true;
    $("tx-view").hidden = false;
    $("tx-gid").textContent = gid;
    refreshTx();
  } else {
    current = null;
    $("tx-view").hidden = true;
    $("list-view").hidden = false;
    refreshList();
  }
}

async function tick() {
  const ok = await refreshCounts();
  if (ok) {
    if (current) await refreshTx(); else await refreshList();
  }
  setTimeout(tick, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = token();
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    showMessage("", false);
    route();
  });
  for (const id of ["f-state", "f-mode", "f-stuck", "f-age"]) {
    $(id).addEventListener("change", () => { pageToken = ""; refreshList(); });
  }
  $("filters").addEventListener("submit", (ev) => ev.preventDefault());
  $("retry").addEventListener("click", retry);
  $("resolve-form").addEventListener("submit", resolve);
  window.addEventListener("hashchange", route);
  route();
  tick();
});
