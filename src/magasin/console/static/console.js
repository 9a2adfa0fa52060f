// The magasin operator console: a client of magasin's public HTTP API, rendered in the
// browser with Alpine.js (components below), charts by uPlot, style by Pico CSS. It has no
// access of its own: every call carries the API key the operator signed in with, and live
// views use Server-Sent Events opened with a short-lived stream token of that key.
"use strict";

const BASE = new URL("..", location.href); // the console is served at <base>/console/
const KEY_SLOT = "magasin.apiKey";
const STATUSES = ["PENDING", "PAYMENT_PROCESSED", "INVENTORY_RESERVED", "FULFILLED", "COMPLETED",
                  "CANCELLING", "CANCELLED"];
const TERMINAL = new Set(["COMPLETED", "CANCELLED"]);
const SAGA_STATES = ["PENDING", "PAYMENT_PROCESSED", "INVENTORY_RESERVED", "FULFILLED", "CANCELLING"];
// Events that say a step failed, and those that undo a step: marked in a sale's timeline.
const FAILURES = new Set(["PaymentFailed", "InventoryUnavailable", "OrderFulfillmentFailed",
                          "SagaAborted", "ReservationExpired", "FulfilmentRefused",
                          "CompensationStalled"]);
const COMPENSATIONS = new Set(["CompensationStarted", "PaymentRefunded", "RefundRecorded",
                               "InventoryReleased", "ReleaseRecorded", "StockReleased",
                               "ReservationVoided", "TransactionCancelled", "ChargeReconciled"]);
const EVENT_TYPES = [
  "TransactionCreated", "PaymentProcessed", "PaymentFailed", "InventoryReserved",
  "InventoryUnavailable", "OrderFulfilled", "OrderFulfillmentFailed", "PaymentRefunded",
  "InventoryReleased", "InventoryCommitted", "TransactionCompleted", "TransactionCancelled",
  "PaymentRecorded", "ReservationRecorded", "FulfilmentRecorded", "CompensationStarted",
  "RefundRecorded", "ReleaseRecorded", "SagaAborted", "StockAdded", "StockReserved",
  "StockReleased", "StockCommitted", "ReservationFulfilled", "ReservationVoided",
  "ReservationExpired", "FulfilmentRefused", "CompensationStalled", "ChargeReconciled",
  "StoreRegistered", "StoreClosed", "StoreReopened", "ProductAdded", "ProductPriceChanged",
  "SkuClaimed", "AuditEntryRecorded",
];
const SALES_SHOWN = 100;

// -- the API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, detail) {
    super(typeof detail === "string" ? detail : JSON.stringify(detail ?? code ?? status));
    this.status = status;
    this.code = code;
  }
}

function apiUrl(path, query = {}) {
  const url = new URL(path.replace(/^\//, ""), BASE);
  for (const [name, value] of Object.entries(query)) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.append(name, value);
  }
  return url;
}

async function call(method, path, { query, body, accept, key } = {}) {
  const headers = { "X-API-Key": key ?? sessionStorage.getItem(KEY_SLOT) ?? "" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (accept) headers.Accept = accept;
  let response;
  try {
    response = await fetch(apiUrl(path, query), {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "unreachable", `cannot reach magasin at ${BASE.href}`);
  }
  if (!response.ok) {
    let data = {};
    try { data = await response.json(); } catch { /* not JSON: keep the status */ }
    throw new ApiError(response.status, data.error, data.detail ?? response.statusText);
  }
  if (accept === "text/csv") return response;
  return response.status === 204 ? null : response.json();
}

const get = (path, query) => call("GET", path, { query });
const post = (path, query, body) => call("POST", path, { query, body });

async function allPages(path, query, max = 10) {
  const items = [];
  let cursor;
  for (let i = 0; i < max; i++) {
    const page = await get(path, { ...query, cursor });
    items.push(...page.items);
    if (!page.next_cursor) break;
    cursor = page.next_cursor;
  }
  return items;
}

/** What to tell the operator about a failed call: what happened and what to do. */
function advice(err) {
  const detail = err.message;
  switch (err.status) {
    case 0: return [`Cannot reach magasin.`, `Is it running? (${detail})`];
    case 401: return ["The API key was refused.", "Sign in again with a key of MAGASIN_API_KEYS (embedded: ./var/api-key)."];
    case 403: return ["Not allowed with this key.", "This needs an admin key (MAGASIN_ADMIN_API_KEYS)."];
    case 404: return ["Not found.", detail];
    case 409: return ["Refused: it changed meanwhile.", detail];
    case 400: case 422: return ["The request was refused.", detail];
    case 429: return ["Too many requests.", "Wait a moment, then try again."];
    case 502: case 503: case 504: return ["A service is unavailable.", `${detail} — try again in a moment.`];
    default: return [`Error ${err.status}.`, detail];
  }
}

function report(err) {
  if (!(err instanceof ApiError)) {
    console.error(err);
    err = new ApiError(-1, "bug", String(err));
  }
  if (err.status === 401) Alpine.store("session").signOut("Your API key was refused: sign in again.");
  const [title, text] = advice(err);
  Alpine.store("ui").fail(title, text);
}

/**
 * Follow a Server-Sent Events route: `handlers` maps event names to functions of the parsed
 * data. EventSource cannot send headers, so each connection first gets a stream token
 * (valid a minute, for SSE routes only) with the key; on any error it reconnects with a new
 * one, backing off up to 15 s. `onState` hears "connecting", "live", "reconnecting".
 */
function openStream(path, query, handlers, onState = () => {}) {
  let source = null;
  let closed = false;
  let delay = 1000;
  let timer = null;
  const retry = () => {
    if (closed) return;
    timer = setTimeout(connect, delay);
    delay = Math.min(delay * 2, 15000);
  };
  async function connect() {
    if (closed) return;
    onState("connecting");
    let token;
    try {
      token = (await post("/api/auth/stream-token")).token;
    } catch (err) {
      if (err.status === 401) return report(err);
      onState("reconnecting");
      return retry();
    }
    if (closed) return;
    source = new EventSource(apiUrl(path, { ...query, access_token: token }));
    source.addEventListener("open", () => { delay = 1000; onState("live"); });
    for (const [name, handle] of Object.entries(handlers)) {
      source.addEventListener(name, (e) => handle(JSON.parse(e.data)));
    }
    source.addEventListener("timeout", () => { source.close(); connect(); });
    source.onerror = () => { source.close(); onState("reconnecting"); retry(); };
  }
  connect();
  return { close() { closed = true; clearTimeout(timer); source?.close(); } };
}

// -- formatting ------------------------------------------------------------------------------

const moneyFormats = new Map();
function money(cents, currency) {
  if (cents === undefined || cents === null) return "";
  if (!moneyFormats.has(currency)) {
    moneyFormats.set(currency, new Intl.NumberFormat(undefined, { style: "currency", currency: currency || "CAD" }));
  }
  return moneyFormats.get(currency).format(cents / 100);
}
const clock = (iso) => iso ? new Date(iso).toLocaleTimeString(undefined, { hour12: false }) : "";
const short = (id) => id ? "…" + id.slice(-8) : "";
const rate = (perS) => perS >= 10 ? perS.toFixed(0) : perS >= 1 ? perS.toFixed(1) : perS === 0 ? "0" : perS.toPrecision(2);
/** A chart tick: the time on whole minutes, `:ss` between them. */
function clockTick(seconds) {
  const d = new Date(seconds * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return d.getSeconds() ? `:${pad(d.getSeconds())}` : `${pad(d.getHours())}:${pad(d.getMinutes())}`;
}
const ms = (value) => value === null || value === undefined ? "–" : `${Math.round(value)} ms`;
const pretty = (value) => value === null || value === undefined ? "" : typeof value === "string" ? value : JSON.stringify(value, null, 2);
function until(iso) {
  if (!iso) return "";
  const seconds = Math.round((new Date(iso) - Date.now()) / 1000);
  if (seconds <= 0) return "expired, being released";
  return seconds < 90 ? `in ${seconds} s` : `in ${Math.round(seconds / 60)} min`;
}
function duration(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}
/** A datetime-local value (the browser's zone) as an ISO instant, or undefined. */
const instant = (local) => local ? new Date(local).toISOString() : undefined;
const stateLabel = (state) => ({ live: "● live", connecting: "connecting…", reconnecting: "reconnecting…" })[state] ?? state;
/** The service that emitted an event: its metadata says so (`service`, or the consumer
 * whose handler emitted it, named `<service>[.<part>]`). */
function serviceOf(event) {
  const meta = event.metadata ?? {};
  return meta.service ?? (meta.consumer ?? "").split(".")[0] ?? event.stream_id.split("-")[0];
}
const helpers = { STATUSES, EVENT_TYPES, money, clock, short, ms, rate, pretty, until, stateLabel, serviceOf };

// -- components ------------------------------------------------------------------------------

document.addEventListener("alpine:init", () => {
  Alpine.store("ui", {
    error: null,
    note: null,
    noteTimer: null,
    fail(title, advice) { this.error = { title, advice }; },
    tell(text) {
      this.note = text;
      clearTimeout(this.noteTimer);
      this.noteTimer = setTimeout(() => { this.note = null; }, 6000);
    },
    dismiss() { this.error = null; },
  });

  Alpine.store("session", {
    signedIn: false,
    admin: false,
    keyId: "",
    health: null,
    config: {},
    async start(key) {
      const me = await call("GET", "/api/auth/whoami", { key });
      sessionStorage.setItem(KEY_SLOT, key);
      this.admin = me.admin;
      this.keyId = me.key_id;
      this.signedIn = true;
      Alpine.store("catalog").load();
      get("/health").then((h) => { this.health = h; }).catch(() => {});
      fetch("config.json").then((r) => r.json()).then((c) => { this.config = c; }).catch(() => {});
    },
    signOut(reason) {
      sessionStorage.removeItem(KEY_SLOT);
      this.signedIn = false;
      this.admin = false;
      if (reason) Alpine.store("ui").tell(reason);
    },
  });

  Alpine.store("catalog", {
    stores: [],
    products: [],
    async load() {
      try {
        [this.stores, this.products] = await Promise.all([
          allPages("/api/stores", { limit: 500 }), allPages("/api/products", { limit: 500 }),
        ]);
      } catch (err) { report(err); }
    },
    storeName(id) { return this.stores.find((s) => s.store_id === id)?.name ?? short(id); },
    productName(id) { return this.products.find((p) => p.product_id === id)?.name ?? short(id); },
  });

  Alpine.data("consoleApp", () => ({
    sections: [
      { id: "sales", label: "Sales" }, { id: "stock", label: "Stock" },
      { id: "dead-letters", label: "Dead letters" }, { id: "sagas", label: "Stuck sagas" },
      { id: "events", label: "Event store" }, { id: "audit", label: "Audit" },
      { id: "health", label: "Health" },
    ],
    page: "sales",
    param: null,
    keyInput: "",
    signingIn: false,
    signInError: "",
    init() {
      this.route();
      const key = sessionStorage.getItem(KEY_SLOT);
      if (key) Alpine.store("session").start(key).catch(() => Alpine.store("session").signOut());
    },
    route() {
      const [page, param] = location.hash.replace(/^#\/?/, "").split("/");
      this.page = page || "sales";
      this.param = param ? decodeURIComponent(param) : null;
      Alpine.store("ui").dismiss();
      this.$nextTick(() => document.getElementById("main")?.focus({ preventScroll: true }));
    },
    async signIn() {
      this.signingIn = true;
      this.signInError = "";
      try {
        await Alpine.store("session").start(this.keyInput);
        this.keyInput = "";
      } catch (err) {
        this.signInError = err.status === 401
          ? "This key was refused. Use one of MAGASIN_API_KEYS (embedded: the key printed at start-up, in ./var/api-key)."
          : advice(err).join(" ");
      } finally {
        this.signingIn = false;
      }
    },
    signOut() { Alpine.store("session").signOut("Signed out."); },
  }));

  // 1. Live sales: a live stream of sale changes, a rolling window of how sagas end.
  Alpine.data("sales", () => ({
    ...helpers,
    filters: { store_id: "", status: "", customer_id: "" },
    rows: [],
    state: "connecting",
    ready: false,
    paused: false,
    buffered: [],
    stats: null,
    windowS: 300,
    bucketS: 10,
    stream: null,
    plot: null,
    statsTimer: null,
    statsDue: false,
    init() {
      this.connect();
      this.loadStats();
      // The window slides with time even when no sale ends.
      this.statsTimer = setInterval(() => this.loadStats(), 10000);
      this.resize = () => this.plot?.setSize(this.chartSize());
      window.addEventListener("resize", this.resize);
    },
    destroy() {
      this.stream?.close();
      clearInterval(this.statsTimer);
      window.removeEventListener("resize", this.resize);
      this.plot?.destroy();
    },
    connect() {
      this.stream?.close();
      this.rows = [];
      this.buffered = [];
      this.ready = false;
      this.stream = openStream("/api/transactions/live", { ...this.filters, recent: 50 }, {
        sale: (sale) => this.paused ? this.buffered.push(sale) : this.apply(sale),
        gone: (gone) => { this.rows = this.rows.filter((r) => r.transaction_id !== gone.transaction_id); },
        ready: () => { this.ready = true; },
        reload: () => this.connect(),
      }, (state) => { this.state = state; });
    },
    flush() {
      for (const sale of this.buffered.splice(0)) this.apply(sale);
    },
    apply(sale) {
      const at = this.rows.findIndex((r) => r.transaction_id === sale.transaction_id);
      if (at >= 0) {
        if (this.rows[at].version < sale.version) this.rows[at] = sale; // updated in place
      } else {
        // Rows stay in id order, which is creation order: newest first.
        let i = 0;
        while (i < this.rows.length && this.rows[i].transaction_id > sale.transaction_id) i++;
        if (i >= SALES_SHOWN) return;
        this.rows.splice(i, 0, sale);
        if (this.rows.length > SALES_SHOWN) this.rows.pop();
      }
      if (TERMINAL.has(sale.status) && this.ready) this.statsSoon();
    },
    statsSoon() {
      if (this.statsDue) return;
      this.statsDue = true;
      setTimeout(() => { this.statsDue = false; this.loadStats(); }, 2000);
    },
    async loadStats() {
      try {
        this.stats = await get("/api/transactions/stats", {
          window: this.windowS, bucket: this.bucketS, store_id: this.filters.store_id,
        });
        this.draw();
      } catch (err) { if (err.status === 401) report(err); }
    },
    inFlight() {
      return Object.values(this.stats?.in_flight ?? {}).reduce((a, b) => a + b, 0);
    },
    reasons() {
      if (!this.stats?.cancelled) return "";
      return "cancelled: " + Object.entries(this.stats.cancelled_by_reason).map(([r, n]) => `${r} ${n}`).join(", ");
    },
    chartSize() {
      return { width: Math.max(260, this.$refs.chart?.clientWidth ?? 600), height: 170 };
    },
    draw() {
      const b = this.stats.buckets;
      const data = [
        b.map((x) => new Date(x.start).getTime() / 1000 + this.bucketS),
        b.map((x) => x.completed / this.bucketS),
        b.map((x) => x.cancelled / this.bucketS),
        b.map((x) => x.p95_ms),
      ];
      if (this.plot) return this.plot.setData(data);
      this.plot = new uPlot({
        ...this.chartSize(),
        legend: { live: false },
        cursor: { show: false },
        scales: { x: { time: true }, rate: { auto: true, range: (u, lo, hi) => [0, Math.max(1, hi)] }, ms: { auto: true } },
        series: [
          {},
          { label: "completed/s", scale: "rate", stroke: "#1b873f", fill: "rgba(27,135,63,.15)", width: 2, points: { show: false } },
          { label: "cancelled/s", scale: "rate", stroke: "#c2410c", fill: "rgba(194,65,12,.12)", width: 2, points: { show: false } },
          { label: "p95 ms", scale: "ms", stroke: "#4f46e5", width: 1.5, dash: [4, 4], spanGaps: true, points: { size: 4 } },
        ],
        axes: [{ values: (u, splits) => splits.map(clockTick) },
               { scale: "rate", label: "sagas/s" }, { scale: "ms", side: 1, label: "p95 ms", grid: { show: false } }],
      }, data, this.$refs.chart);
    },
  }));

  // 2. A sale's timeline: its events across services, and its state replayed at any version.
  Alpine.data("timeline", (id) => ({
    ...helpers,
    id,
    sale: null,
    missing: false,
    events: [],
    showAudit: false,
    opened: null,
    streamEvents: [],
    streamVersion: 1,
    version: 1,
    replayed: null,
    follow: null,
    replayTimer: null,
    reloadTimer: null,
    async init() {
      await this.load();
      if (this.sale && !TERMINAL.has(this.sale.status)) {
        this.follow = openStream(`/api/transactions/${encodeURIComponent(id)}/events`, {}, {
          status: () => this.reloadSoon(),
        });
      }
    },
    destroy() {
      this.follow?.close();
      clearTimeout(this.replayTimer);
      clearTimeout(this.reloadTimer);
    },
    reloadSoon() {
      clearTimeout(this.reloadTimer);
      this.reloadTimer = setTimeout(() => this.load(), 150);
    },
    async load() {
      try {
        const stream = `transaction-${id}`;
        const [sale, events, log] = await Promise.all([
          get(`/api/transactions/${encodeURIComponent(id)}`, { min_version: 1 }),
          allPages("/api/events", { correlation_id: id, limit: 1000 }, 5),
          get(`/api/streams/${encodeURIComponent(stream)}`),
        ]);
        const atEnd = this.version === this.streamVersion;
        this.sale = sale;
        this.events = events;
        this.streamEvents = log.items;
        this.streamVersion = log.version;
        if (atEnd || !this.replayed) {
          this.version = log.version;
          await this.replay();
        }
        if (TERMINAL.has(sale.status)) this.follow?.close();
      } catch (err) {
        if (err.status === 404) this.missing = true;
        else report(err);
      }
    },
    replaySoon() {
      clearTimeout(this.replayTimer);
      this.replayTimer = setTimeout(() => this.replay(), 120);
    },
    async replay() {
      const version = this.version;
      try {
        const state = await post(`/api/replay/aggregate/${encodeURIComponent("transaction-" + id)}`, { version });
        if (version === this.version) this.replayed = state;
      } catch (err) { report(err); }
    },
    visible() { return this.showAudit ? this.events : this.events.filter((e) => e.type !== "AuditEntryRecorded"); },
    get t0() { return this.events.length ? new Date(this.events[0].occurred_at).getTime() : 0; },
    get span() {
      const v = this.visible();
      return v.length ? Math.max(1, new Date(v[v.length - 1].occurred_at).getTime() - this.t0) : 1;
    },
    offset(e) { return (new Date(e.occurred_at).getTime() - this.t0).toFixed(0); },
    bar(e) {
      const left = (new Date(e.occurred_at).getTime() - this.t0) / this.span * 100;
      return `left: min(${left.toFixed(2)}%, calc(100% - 6px))`;
    },
    replayPoint(e) { return e.stream_id === `transaction-${id}` && e.stream_version === this.version; },
    kind(type) { return FAILURES.has(type) ? "failure" : COMPENSATIONS.has(type) ? "compensation" : "step"; },
    service(e) { return serviceOf(e); },
    toggle(e) { this.opened = this.opened === e.event_id ? null : e.event_id; },
    get openedEvent() { return this.events.find((e) => e.event_id === this.opened) ?? null; },
    get traceId() {
      const parent = this.events.find((e) => e.traceparent)?.traceparent;
      return parent ? parent.split("-")[1] : null;
    },
    get traceLink() {
      const template = Alpine.store("session").config.trace_url;
      return template && this.traceId ? template.replace("{trace_id}", this.traceId) : null;
    },
  }));

  // 3. Stock per store and product, the reservations held, restocking.
  Alpine.data("stock", () => ({
    ...helpers,
    storeId: "",
    lines: [],
    reservations: [],
    amounts: {},
    loaded: false,
    init() {
      this.$watch("$store.catalog.stores", () => { if (!this.storeId) this.pickFirst(); });
      this.pickFirst();
    },
    pickFirst() {
      const first = Alpine.store("catalog").stores[0];
      if (first && !this.storeId) { this.storeId = first.store_id; this.load(); }
    },
    async load() {
      if (!this.storeId) return;
      try {
        const store = encodeURIComponent(this.storeId);
        [this.lines, this.reservations] = await Promise.all([
          allPages(`/api/stock/${store}`, { limit: 500 }),
          get("/api/reservations", { store_id: this.storeId, status: "RESERVED", order: "desc", limit: 200 }).then((p) => p.items),
        ]);
        this.loaded = true;
      } catch (err) { report(err); }
    },
    async restock(line) {
      const quantity = this.amounts[line.product_id];
      try {
        const updated = await post(`/api/stock/${encodeURIComponent(this.storeId)}/${encodeURIComponent(line.product_id)}/restock`,
          {}, { quantity, reason: "restock from the console" });
        Object.assign(line, updated);
        this.amounts[line.product_id] = null;
        Alpine.store("ui").tell(`Added ${quantity} × ${Alpine.store("catalog").productName(line.product_id)}: ${updated.available} available.`);
      } catch (err) { report(err); }
    },
  }));

  // 4. Dead letters, live: listing, payload and error, requeue or archive one or many.
  Alpine.data("deadLetters", () => ({
    ...helpers,
    filters: { consumer: "", type: "", reason: "", status: "all" },
    items: [],
    selected: [],
    letter: null,
    ready: false,
    state: "connecting",
    stream: null,
    init() { this.connect(); },
    destroy() { this.stream?.close(); },
    connect() {
      this.stream?.close();
      this.ready = false;
      this.stream = openStream("/api/dead-letters/live", { ...this.filters, limit: 500 }, {
        letters: (data) => {
          this.items = data.items;
          const ids = new Set(data.items.map((l) => l.id));
          this.selected = this.selected.filter((id) => ids.has(id));
          this.ready = true;
        },
      }, (state) => { this.state = state; });
    },
    outcome(l) {
      if (l.status === "requeued") return l.handled ? "handled" : "requeued";
      return l.status;
    },
    outcomeLabel(l) {
      return { handled: "handled ✓", requeued: "requeued, waiting…", pending: "pending", archived: "archived" }[this.outcome(l)];
    },
    selectAll(on) { this.selected = on ? this.items.map((l) => l.id) : []; },
    async show(id) {
      try { this.letter = await get(`/api/dead-letters/${encodeURIComponent(id)}`); } catch (err) { report(err); }
    },
    async act(action, id) {
      try {
        await post(`/api/dead-letters/${encodeURIComponent(id)}/${action}`);
        Alpine.store("ui").tell(action === "requeue" ? "Requeued: its outcome shows here once the consumer has it." : "Archived.");
      } catch (err) { report(err); }
    },
    async bulk(action) {
      const ids = [...this.selected];
      let done = 0;
      const refused = [];
      for (const id of ids) {
        const letter = this.items.find((l) => l.id === id);
        if (action === "requeue" && (letter?.status !== "pending" || !letter?.type)) { refused.push(id); continue; }
        try { await post(`/api/dead-letters/${encodeURIComponent(id)}/${action}`); done++; }
        catch (err) { if (err.status === 401) return report(err); refused.push(id); }
      }
      this.selected = [];
      Alpine.store("ui").tell(`${action === "requeue" ? "Requeued" : "Archived"} ${done} of ${ids.length}` +
        (refused.length ? ` (${refused.length} not: only pending, readable letters can be requeued)` : "") + ".");
    },
  }));

  // 5. Stuck sagas by step and age; force compensation with an admin key.
  Alpine.data("sagas", () => ({
    ...helpers,
    STEPS: ["order", "payment", "reservation", "fulfilment", "compensation"],
    olderThan: 5,
    items: [],
    loaded: false,
    confirming: null,
    now: Date.now(),
    ticker: null,
    init() {
      this.load();
      this.ticker = setInterval(() => { this.now = Date.now(); }, 1000); // ages tick locally
    },
    destroy() { clearInterval(this.ticker); },
    async load() {
      try {
        const pages = await Promise.all(SAGA_STATES.map((state) =>
          allPages("/api/sagas", { state, older_than: this.olderThan, limit: 500 }, 4)));
        this.items = pages.flat();
        this.now = Date.now();
        this.loaded = true;
      } catch (err) { report(err); }
    },
    ageOf(s) { return (this.now - new Date(s.step_started_at).getTime()) / 1000; },
    age(s) { return duration(this.ageOf(s)); },
    sorted() { return [...this.items].sort((a, b) => this.ageOf(b) - this.ageOf(a)); },
    async compensate(s) {
      if (this.confirming !== s.transaction_id) { this.confirming = s.transaction_id; return; }
      this.confirming = null;
      try {
        const done = await post(`/api/sagas/${encodeURIComponent(s.transaction_id)}/compensate`);
        Alpine.store("ui").tell(done.aborted_step === "compensation"
          ? `Asked again for the compensation of ${short(s.transaction_id)} (retry ${done.attempt}).`
          : `Compensating ${short(s.transaction_id)} (was waiting for its ${done.aborted_step}).`);
        await this.load();
        // The list reads the saga index, which may lag behind this answer under load: the
        // row shows what the force recorded until the index catches up.
        const row = this.items.find((i) => i.transaction_id === s.transaction_id);
        if (row && row.status !== done.status && !["COMPLETED", "CANCELLED"].includes(row.status)) {
          Object.assign(row, { status: done.status, step: "compensation", stuck: false,
                               step_started_at: new Date(this.now).toISOString() });
        }
      } catch (err) { report(err); }
    },
  }));

  // 6. Event store: browse and filter the log, an event's JSON, read models as of an instant.
  Alpine.data("events", () => ({
    ...helpers,
    filters: { stream_id: "", type: "", correlation_id: "", from: "", to: "", order: "desc" },
    items: [],
    pages: [],
    after: null,
    next: null,
    searched: false,
    event: null,
    asOf: "",
    state: null,
    init() { this.search(true); },
    query() {
      const f = this.filters;
      return { stream_id: f.stream_id, type: f.type, correlation_id: f.correlation_id,
               from: instant(f.from), to: instant(f.to), order: f.order, limit: 50 };
    },
    async search(fresh) {
      if (fresh) { this.pages = []; this.after = null; }
      try {
        const page = await get("/api/events", { ...this.query(), cursor: this.after });
        this.items = page.items;
        this.next = page.next_cursor;
        this.searched = true;
      } catch (err) { report(err); }
    },
    forward() { this.pages.push(this.after); this.after = this.next; this.search(false); },
    back() { this.after = this.pages.pop() ?? null; this.search(false); },
    async open(eventId) {
      try { this.event = await get(`/api/events/${encodeURIComponent(eventId)}`); } catch (err) { report(err); }
    },
    async asOfState() {
      try { this.state = await get("/api/state", { asOf: instant(this.asOf) }); } catch (err) { report(err); }
    },
    countBy(rows, field) {
      const counts = {};
      for (const row of rows) counts[row[field]] = (counts[row[field]] ?? 0) + 1;
      return Object.entries(counts).map(([k, n]) => `${n} ${k}`).join(", ") || "none";
    },
  }));

  // 7. Audit: verify the chain, the trail of a correlation id, CSV export.
  Alpine.data("audit", () => ({
    ...helpers,
    result: null,
    verifying: false,
    correlationId: "",
    entries: null,
    range: { from: "", to: "", type: "" },
    exporting: false,
    async verify() {
      this.verifying = true;
      try { this.result = await get("/api/audit/verify"); } catch (err) { report(err); }
      finally { this.verifying = false; }
    },
    async trail() {
      try { this.entries = await get(`/api/audit/trail/${encodeURIComponent(this.correlationId)}`); }
      catch (err) { report(err); }
    },
    async exportCsv() {
      this.exporting = true;
      try {
        // A plain link could not send the key: fetch with it, then save what came back.
        const response = await call("GET", "/api/audit", {
          accept: "text/csv",
          query: { format: "csv", from: instant(this.range.from), to: instant(this.range.to), type: this.range.type },
        });
        const url = URL.createObjectURL(await response.blob());
        const link = Object.assign(document.createElement("a"), { href: url, download: "magasin-audit.csv" });
        document.body.append(link);
        link.click();
        link.remove();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      } catch (err) { report(err); }
      finally { this.exporting = false; }
    },
  }));

  // 8. Health of every process: services, breaker, projection lag, outbox, partitions.
  Alpine.data("health", () => ({
    ...helpers,
    processes: [],
    checkedAt: null,
    timer: null,
    init() {
      this.load();
      this.timer = setInterval(() => this.load(), 5000);
    },
    destroy() { clearInterval(this.timer); },
    async load() {
      let top;
      try { top = await get("/health"); }
      catch (err) {
        // 503 answers a body too (a degraded store): show it rather than only the error.
        this.processes = [{ name: "magasin", body: null, error: advice(err).join(" ") }];
        return;
      }
      const found = [{ name: top.mode === "distributed" ? "this URL" : "magasin", body: top, error: null }];
      // Behind the gateway each service's process answers at /health/<service>.
      if (top.mode === "distributed") {
        await Promise.all((top.services ?? []).map(async (service) => {
          try { found.push({ name: service, body: await get(`/health/${encodeURIComponent(service)}`), error: null }); }
          catch (err) { found.push({ name: service, body: null, error: advice(err).join(" ") }); }
        }));
      }
      this.processes = found;
      this.checkedAt = new Date().toISOString();
    },
    breaker(body) { return Object.values(body?.checks ?? {}).find((c) => c.bank_circuit_breaker)?.bank_circuit_breaker ?? null; },
    pendingLetters(body) {
      const pending = Object.entries(body?.dead_letters_pending ?? {}).filter(([, n]) => n > 0);
      return pending.length ? pending.map(([c, n]) => `${c}: ${n}`).join(", ") : "none";
    },
    partitions(body) {
      if (!body) return [];
      const found = [];
      const add = (value, owner) => {
        if (Array.isArray(value)) found.push(...value.map((row) => owner ? { service: owner, ...row } : row));
        else if (value && typeof value === "object") {
          for (const [name, row] of Object.entries(value)) found.push({ ...(owner ? { service: owner } : {}), partition: name, ...(typeof row === "object" ? row : { value: row }) });
        }
      };
      add(body.partitions, null);
      for (const [service, check] of Object.entries(body.checks ?? {})) add(check.partitions, service);
      return found;
    },
    columns(rows) { return [...new Set(rows.flatMap((row) => Object.keys(row)))]; },
    cell(value) { return value !== null && typeof value === "object" ? JSON.stringify(value) : value ?? ""; },
  }));
});
