// The try-it page: talks only to the gateway that served it (same origin, relative URLs).
//   POST /v1/recommendations (debug: true) -> the list, its bundle version, stage timings, partial/degraded
//   GET  /v1/items?ids=...                  -> titles and genres of the recommended items, one batch call
//   GET  /v1/items?query=...                -> title search
//   POST /v1/events                         -> a click; then the list is fetched again
"use strict";

const K = 10;
const state = { userId: "", previous: [], history: [], titles: new Map(), searchSeq: 0 };

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  // An API key (rsk_...) or a JWT, kept in this page only and sent to this gateway only.
  const token = $("token").value.trim();
  if (token) init.headers.Authorization = (token.startsWith("rsk_") ? "ApiKey " : "Bearer ") + token;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const reply = await fetch(path, init);
  const data = await reply.json().catch(() => ({}));
  if (!reply.ok) {
    const message = data.error ? data.error.message : reply.statusText;
    if (reply.status === 401) $("token").closest("details").open = true;
    throw new Error(`${method} ${path.split("?")[0]}: ${reply.status} ${message}`);
  }
  return data;
}

function showError(err) {
  const box = $("error");
  box.textContent = err ? String(err.message || err) : "";
  box.hidden = !err;
}

function randomUserId() {
  const bytes = new Uint8Array(6);
  crypto.getRandomValues(bytes);
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function itemDetails(ids) {
  if (!ids.length) return new Map();
  const query = ids.map((id) => "ids=" + encodeURIComponent(id)).join("&");
  const data = await api("GET", `/v1/items?${query}&limit=${Math.min(ids.length, 100)}`);
  return new Map(data.items.map((item) => [item.item_id, item]));
}

function chips(values, cls) {
  return el("span", { class: "chips" }, ...values.map((v) => el("span", { class: "chip " + cls }, v)));
}

function renderBanner(answer) {
  const banner = $("banner");
  const parts = [];
  if (answer.partial) {
    const why = answer.missing.map((m) => `${m.stage} (${m.reason})`).join("; ");
    parts.push(`Partial answer: some candidate sources did not answer: ${why}.`);
  }
  if (answer.degraded) parts.push(`Degraded answer, not in ranked order: ${answer.degraded}.`);
  banner.textContent = parts.join(" ");
  banner.hidden = parts.length === 0;
  banner.className = "banner" + (answer.degraded ? " degraded" : answer.partial ? " partial" : "");
}

function renderTimings(timings) {
  const body = $("timings").tBodies[0];
  body.replaceChildren();
  for (const [stage, ms] of Object.entries(timings || {})) {
    body.append(el("tr", {}, el("th", {}, stage), el("td", {}, ms.toFixed(1) + " ms")));
  }
}

function renderRecs(answer, details) {
  const ids = answer.items.map((i) => i.item_id);
  const before = new Set(state.previous);
  const first = state.previous.length === 0;
  const list = $("recs");
  list.replaceChildren();
  answer.items.forEach((item, rank) => {
    const info = details.get(item.item_id) || { title: item.title, genres: [] };
    const entered = !first && !before.has(item.item_id);
    const card = el(
      "li",
      {
        class: "card" + (entered ? " entered" : ""),
        tabIndex: 0,
        title: "click: send a click event for this item",
        "data-item-id": item.item_id,
        "data-genres": info.genres.join("|"),
      },
      el("div", { class: "rank" }, String(rank + 1)),
      el("div", { class: "title" }, info.title || item.item_id),
      chips(info.genres, "genre"),
      el("div", { class: "score" }, "score ", el("b", {}, item.score.toFixed(3))),
      chips(item.sources, "source"),
    );
    if (entered) card.append(el("span", { class: "badge" }, "new"));
    card.addEventListener("click", () => click(item.item_id, info.title));
    card.addEventListener("keydown", (e) => e.key === "Enter" && click(item.item_id, info.title));
    list.append(card);
  });
  const left = first ? [] : state.previous.filter((id) => !ids.includes(id));
  $("left").replaceChildren(...left.map((id) => el("li", { "data-item-id": id }, state.titles.get(id) || id)));
  $("left-box").hidden = left.length === 0;
  state.previous = ids;
  for (const [id, info] of details) state.titles.set(id, info.title);
}

async function refresh() {
  if (!state.userId) return;
  document.body.dataset.busy = "1";
  try {
    const answer = await api("POST", "/v1/recommendations", { user_id: state.userId, k: K, debug: true });
    const details = await itemDetails(answer.items.map((i) => i.item_id));
    $("bundle-version").textContent = answer.bundle_version;
    renderBanner(answer);
    renderTimings(answer.timings_ms);
    renderRecs(answer, details);
    showError(null);
  } catch (err) {
    showError(err);
  } finally {
    delete document.body.dataset.busy;
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes) + 1);
  }
}

function renderHistory() {
  $("history").replaceChildren(
    ...state.history.map((h) =>
      el("li", { "data-item-id": h.itemId }, h.title || h.itemId, el("span", { class: "muted small" }, " " + h.at)),
    ),
  );
}

async function click(itemId, title) {
  const now = new Date();
  const event = {
    user_id: state.userId,
    item_id: itemId,
    timestamp: Math.floor(now.getTime() / 1000),
    event_id: `${state.userId}/${now.getTime()}/${itemId}`,
    type: "click",
  };
  try {
    await api("POST", "/v1/events", { events: [event] });
  } catch (err) {
    showError(err);
    return;
  }
  state.history.unshift({ itemId, title, at: now.toLocaleTimeString() });
  state.history.length = Math.min(state.history.length, 20);
  renderHistory();
  await refresh();
}

function useUser(userId) {
  state.userId = userId;
  state.previous = [];
  state.history = [];
  $("user-id").value = userId;
  $("current-user").textContent = userId;
  renderHistory();
  return refresh();
}

async function search() {
  const seq = ++state.searchSeq;
  const query = $("search").value.trim();
  const results = $("search-results");
  if (!query) {
    results.replaceChildren();
    return;
  }
  try {
    const data = await api("GET", `/v1/items?query=${encodeURIComponent(query)}&limit=10`);
    if (seq !== state.searchSeq) return; // a newer search is on its way
    results.replaceChildren(
      ...data.items.map((item) => {
        const row = el(
          "li",
          { class: "result", tabIndex: 0, "data-item-id": item.item_id, "data-genres": item.genres.join("|") },
          el("span", { class: "title" }, item.title || item.item_id),
          chips(item.genres, "genre"),
        );
        const pick = () => (state.userId ? click(item.item_id, item.title) : showError(new Error("pick a user first")));
        row.addEventListener("click", pick);
        row.addEventListener("keydown", (e) => e.key === "Enter" && pick());
        return row;
      }),
    );
    if (!data.items.length) results.append(el("li", { class: "muted" }, "no title matches"));
  } catch (err) {
    showError(err);
  }
}

function debounce(fn, ms) {
  let timer;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}

$("user-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const userId = $("user-id").value.trim();
  if (userId) useUser(userId);
});
$("new-user").addEventListener("click", () => useUser(randomUserId()));
$("search").addEventListener("input", debounce(search, 150));
