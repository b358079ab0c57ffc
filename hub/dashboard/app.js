// hub command center.
//
// The page speaks the Supabase Realtime (Phoenix vsn 2.0.0) protocol itself:
// it opens the hub's WebSocket with the admin's token, joins
// `realtime:mother`, heartbeats every 25 s and renders every `snapshot`
// broadcast (binary kind-4 frames; see docs/mother.md for the payload).
// Before each (re)connection it reads GET /api/mother/stats, which checks
// the token (401/403 are shown on the page) and fills the page at once.
// No third-party code: charts are inline SVG drawn here.
"use strict";

(() => {
  const TOPIC = "realtime:mother";
  const HEARTBEAT_MS = 25000;
  const TOKEN_KEY = "hub.dashboard.token";
  const SORT_KEY = "hub.dashboard.sort";
  const FEED_MAX = 100;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const decoder = new TextDecoder();

  const $ = (selector, root = document) => root.querySelector(selector);
  const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

  const state = {
    token: null,
    ws: null,
    ref: 0,
    joinRef: null,
    heartbeat: null,
    heartbeatPending: null,
    reconnectTimer: null,
    attempt: 0,
    stopped: false,
    snapshot: null,
    snapshots: 0,
    receivedAt: 0, // performance.now() of the last snapshot
    offset: 0, // server clock - local clock, seconds
    selected: null,
    range: "seconds",
    filter: "",
    sort: loadSort(),
    rows: new Map(),
    feedKeys: new Set(),
    kpis: new Map(),
    historyRange: "24h",
    historyOrg: null,
    history: null,
    historyTimer: null,
  };
  const HISTORY_REFRESH_MS = 60000;

  // -- formatting -------------------------------------------------------------

  const intFormat = new Intl.NumberFormat("en-US");
  const compactFormat = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 });

  function fmtInt(n) {
    if (n === null || n === undefined || Number.isNaN(n)) return "—";
    return Math.abs(n) >= 1e6 ? compactFormat.format(n) : intFormat.format(n);
  }

  function fmtRate(x) {
    if (!x) return "0";
    if (x < 0.1) return x.toFixed(2);
    if (x < 10) return x.toFixed(1);
    return fmtInt(Math.round(x));
  }

  function fmtAgo(seconds) {
    if (seconds === null || seconds === undefined) return "never";
    if (seconds < 1) return "just now";
    if (seconds < 60) return `${Math.floor(seconds)} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return `${Math.floor(seconds / 86400)} d ago`;
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const s = Math.floor(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  function fmtBytes(n) {
    if (!n) return "—";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return `${n.toFixed(n < 10 && i > 0 ? 1 : 0)} ${units[i]}`;
  }

  function fmtClock(at) {
    return new Date(at * 1000).toLocaleTimeString("en-GB", { hour12: false });
  }

  function serverNow() {
    return Date.now() / 1000 + state.offset;
  }

  function orgColor(org) {
    let hash = 0;
    for (let i = 0; i < org.length; i += 1) hash = (hash * 31 + org.charCodeAt(i)) | 0;
    return `hsl(${Math.abs(hash) % 360} 70% 62%)`;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs = {}) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    return node;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  // -- charts -----------------------------------------------------------------

  function niceMax(value) {
    if (value <= 0) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (step * power >= value) return step * power;
    }
    return 10 * power;
  }

  let chartIds = 0;

  // A time series as an area (or bars) with a y axis, x labels and a hover tip.
  class Chart {
    constructor(container, { bars = false, label = "events" } = {}) {
      this.container = container;
      this.bars = bars;
      this.label = label;
      this.values = [];
      this.end = 0;
      this.bucket = 1;
      chartIds += 1;
      const gradient = `chart-gradient-${chartIds}`;
      this.svg = svg("svg", { role: "img" });
      const defs = svg("defs");
      const lg = svg("linearGradient", { id: gradient, x1: "0", x2: "0", y1: "0", y2: "1" });
      lg.append(
        svg("stop", { offset: "0%", "stop-color": "#4f9dff", "stop-opacity": "0.45" }),
        svg("stop", { offset: "100%", "stop-color": "#4f9dff", "stop-opacity": "0.02" }),
      );
      defs.append(lg);
      this.grid = svg("g");
      this.labels = svg("g");
      this.area = svg("path", { fill: `url(#${gradient})` });
      this.line = svg("path", { class: bars ? "bars" : "line" });
      this.dot = svg("circle", { class: "last-dot", r: "3" });
      this.cursor = svg("line", { class: "cursor", visibility: "hidden" });
      this.svg.append(defs, this.grid, this.area, this.line, this.dot, this.cursor, this.labels);
      this.tip = el("div", "chart-tip");
      this.tip.hidden = true;
      container.append(this.svg, this.tip);
      this.svg.addEventListener("mousemove", (event) => this.hover(event));
      this.svg.addEventListener("mouseleave", () => {
        this.cursor.setAttribute("visibility", "hidden");
        this.tip.hidden = true;
      });
    }

    layout() {
      const width = Math.max(this.container.clientWidth, 50);
      const height = Math.max(this.container.clientHeight, 40);
      const compact = height < 100;
      return {
        width,
        height,
        left: compact ? 30 : 40,
        right: 8,
        top: 8,
        bottom: compact ? 4 : 20,
        compact,
      };
    }

    update(values, end, bucket) {
      this.values = values;
      this.end = end;
      this.bucket = bucket;
      const box = this.layout();
      this.box = box;
      this.svg.setAttribute("viewBox", `0 0 ${box.width} ${box.height}`);
      const n = values.length;
      const w = box.width - box.left - box.right;
      const h = box.height - box.top - box.bottom;
      const max = niceMax(Math.max(0, ...values));
      this.max = max;
      const x = (i) => box.left + (n <= 1 ? 0 : (i * w) / (n - 1));
      const y = (v) => box.top + h - (v / max) * h;
      const bottom = box.top + h;

      this.grid.replaceChildren();
      this.labels.replaceChildren();
      const ticks = box.compact ? [0, max] : [0, max / 2, max];
      for (const tick of ticks) {
        const ty = y(tick);
        this.grid.append(svg("line", { class: "grid-line", x1: box.left, x2: box.width - box.right, y1: ty, y2: ty }));
        const text = svg("text", { class: "axis-label", x: box.left - 6, y: ty + 4, "text-anchor": "end" });
        text.textContent = fmtRate(tick);
        this.labels.append(text);
      }
      if (!box.compact && n > 1) {
        const span = n * bucket;
        const step =
          span >= 14 * 86400 ? 5 * 86400
          : span >= 2 * 86400 ? 86400
          : span >= 43200 ? 4 * 3600
          : span >= 3600 ? 900
          : span >= 300 ? 60
          : span >= 60 ? 15
          : 5;
        for (let ago = 0; ago < span; ago += step) {
          const i = n - 1 - ago / bucket;
          if (i < 0) break;
          const text = svg("text", {
            class: "axis-label",
            x: x(i),
            y: box.height - 4,
            "text-anchor": ago === 0 ? "end" : "middle",
          });
          text.textContent =
            ago === 0 ? "now"
            : ago >= 86400 ? `−${ago / 86400} d`
            : ago >= 3600 && ago % 3600 === 0 ? `−${ago / 3600} h`
            : ago >= 60 ? `−${ago / 60} min`
            : `−${ago} s`;
          this.labels.append(text);
        }
      }

      if (this.bars) {
        const slot = w / Math.max(n, 1);
        const bw = Math.max(1, slot - Math.min(3, slot * 0.25));
        let d = "";
        values.forEach((v, i) => {
          if (v > 0) {
            const bx = box.left + i * slot + (slot - bw) / 2;
            d += `M${bx.toFixed(1)} ${bottom}V${y(v).toFixed(1)}h${bw.toFixed(1)}V${bottom}Z`;
          }
        });
        this.line.setAttribute("d", d);
        this.area.setAttribute("d", "");
        this.dot.setAttribute("visibility", "hidden");
      } else {
        let d = "";
        values.forEach((v, i) => {
          d += `${i ? "L" : "M"}${x(i).toFixed(1)} ${y(v).toFixed(1)}`;
        });
        this.line.setAttribute("d", d);
        this.area.setAttribute("d", n ? `${d}L${x(n - 1).toFixed(1)} ${bottom}L${x(0).toFixed(1)} ${bottom}Z` : "");
        if (n) {
          this.dot.setAttribute("cx", x(n - 1));
          this.dot.setAttribute("cy", y(values[n - 1]));
          this.dot.setAttribute("visibility", "visible");
        }
      }
    }

    hover(event) {
      const n = this.values.length;
      if (!n || !this.box) return;
      const rect = this.svg.getBoundingClientRect();
      const box = this.box;
      const px = ((event.clientX - rect.left) / rect.width) * box.width;
      const w = box.width - box.left - box.right;
      const i = Math.max(0, Math.min(n - 1, Math.round(((px - box.left) / w) * (n - 1))));
      const cx = box.left + (n <= 1 ? 0 : (i * w) / (n - 1));
      this.cursor.setAttribute("x1", cx);
      this.cursor.setAttribute("x2", cx);
      this.cursor.setAttribute("y1", box.top);
      this.cursor.setAttribute("y2", box.height - box.bottom);
      this.cursor.setAttribute("visibility", "visible");
      const at = (Math.floor(this.end / this.bucket) - (n - 1 - i)) * this.bucket;
      const when =
        this.bucket >= 3600 ? new Date(at * 1000).toISOString().slice(5, 16).replace("T", " ") + " UTC"
        : this.bucket >= 60 ? fmtClock(at).slice(0, 5)
        : fmtClock(at);
      this.tip.textContent = `${fmtInt(this.values[i])} ${this.label} · ${when}`;
      this.tip.style.left = `${(cx / box.width) * 100}%`;
      this.tip.style.top = `${box.top}px`;
      this.tip.hidden = false;
    }
  }

  function sparkline(width, height) {
    const root = svg("svg", { class: "spark", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none" });
    const area = svg("path", { class: "spark-area" });
    const line = svg("path", { class: "spark-line", "vector-effect": "non-scaling-stroke" });
    root.append(area, line);
    return {
      root,
      update(values) {
        const n = values.length;
        if (!n) return;
        const max = Math.max(1, ...values);
        let d = "";
        values.forEach((v, i) => {
          const px = n <= 1 ? 0 : (i * width) / (n - 1);
          const py = height - 1 - (v / max) * (height - 2);
          d += `${i ? "L" : "M"}${px.toFixed(1)} ${py.toFixed(1)}`;
        });
        line.setAttribute("d", d);
        area.setAttribute("d", `${d}L${width} ${height}L0 ${height}Z`);
      },
    };
  }

  // -- status and banner ------------------------------------------------------

  function setStatus(kind, text) {
    const node = $("#status");
    node.dataset.state = kind;
    setText($("#status-text"), text);
    document.body.dataset.connection = kind;
  }

  function showBanner(text, level = "error") {
    const banner = $("#banner");
    banner.className = level === "warn" ? "banner warn" : "banner";
    setText(banner, text);
    banner.hidden = false;
  }

  function hideBanner() {
    $("#banner").hidden = true;
  }

  // -- token and login --------------------------------------------------------

  function saveToken(token) {
    try {
      localStorage.setItem(TOKEN_KEY, token);
    } catch (_) {
      // Private mode: the token lives as long as the page.
    }
  }

  function loadToken() {
    try {
      return localStorage.getItem(TOKEN_KEY);
    } catch (_) {
      return null;
    }
  }

  function forgetToken() {
    try {
      localStorage.removeItem(TOKEN_KEY);
    } catch (_) {
      // nothing kept
    }
  }

  function loadSort() {
    try {
      const saved = JSON.parse(localStorage.getItem(SORT_KEY) || "null");
      if (saved && typeof saved.key === "string" && (saved.dir === "asc" || saved.dir === "desc")) return saved;
    } catch (_) {
      // default below
    }
    return { key: "5m", dir: "desc" };
  }

  function showLogin(message) {
    stop();
    state.token = null;
    $("#main").hidden = true;
    $("#sign-out").hidden = true;
    $("#login").hidden = false;
    hideBanner();
    const error = $("#login-error");
    if (message) {
      error.textContent = message;
      error.hidden = false;
      setStatus("error", "not authorized");
    } else {
      error.hidden = true;
      setStatus("idle", "not connected");
    }
    $("#token-input").focus();
  }

  function stop() {
    state.stopped = true;
    clearTimeout(state.reconnectTimer);
    stopHeartbeat();
    if (state.ws) {
      const ws = state.ws;
      state.ws = null;
      ws.close(1000);
    }
  }

  // -- connecting -------------------------------------------------------------

  async function fetchStats() {
    let response;
    try {
      response = await fetch(new URL("api/mother/stats", location.href), {
        headers: { Authorization: `Bearer ${state.token}` },
        cache: "no-store",
      });
    } catch (_) {
      return { kind: "unreachable" };
    }
    if (response.status === 401 || response.status === 403) {
      let message = "";
      try {
        message = (await response.json()).message || "";
      } catch (_) {
        // keep the status alone
      }
      const why =
        response.status === 403
          ? "This token is valid but does not belong to a network admin"
          : "The hub refused this token";
      return { kind: "denied", message: `${why} (HTTP ${response.status}${message ? `: ${message}` : ""}).` };
    }
    if (!response.ok) return { kind: "unreachable" };
    try {
      return { kind: "ok", snapshot: await response.json() };
    } catch (_) {
      return { kind: "unreachable" };
    }
  }

  async function begin(token) {
    state.token = token;
    state.stopped = false;
    state.attempt = 0;
    $("#login").hidden = true;
    $("#main").hidden = false;
    $("#sign-out").hidden = false;
    await attempt();
  }

  async function attempt() {
    if (state.stopped) return;
    setStatus("connecting", state.attempt ? `reconnecting (attempt ${state.attempt + 1})…` : "connecting…");
    const result = await fetchStats();
    if (state.stopped) return;
    if (result.kind === "denied") {
      forgetToken();
      showLogin(result.message);
      return;
    }
    if (result.kind === "unreachable") {
      scheduleReconnect("The hub cannot be reached");
      return;
    }
    render(result.snapshot);
    if (!state.history) loadHistory();
    openSocket();
  }

  function scheduleReconnect(reason) {
    if (state.stopped) return;
    clearTimeout(state.reconnectTimer);
    state.attempt += 1;
    const delay = Math.min(10, 2 ** Math.min(state.attempt - 1, 4)) * (0.8 + Math.random() * 0.4);
    setStatus("lost", "connection lost");
    showBanner(`${reason}. Reconnecting in ${Math.ceil(delay)} s… (attempt ${state.attempt}). The numbers below are from ${state.snapshot ? fmtClock(state.snapshot.time) : "—"}.`);
    document.body.classList.add("offline");
    state.reconnectTimer = setTimeout(attempt, delay * 1000);
  }

  function nextRef() {
    state.ref += 1;
    return String(state.ref);
  }

  function send(frame) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(frame));
  }

  function openSocket() {
    const url = new URL("realtime/v1/websocket", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = new URLSearchParams({ apikey: state.token, vsn: "2.0.0" }).toString();
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    state.ws = ws;
    ws.onopen = () => {
      state.joinRef = nextRef();
      send([
        state.joinRef,
        state.joinRef,
        TOPIC,
        "phx_join",
        {
          config: { broadcast: { self: false, ack: false }, presence: { enabled: false }, private: false },
          access_token: state.token,
        },
      ]);
      startHeartbeat();
    };
    ws.onmessage = (event) => {
      if (state.ws !== ws) return;
      try {
        onFrame(event.data);
      } catch (error) {
        console.error("bad frame", error);
      }
    };
    ws.onclose = () => {
      if (state.ws !== ws) return;
      state.ws = null;
      stopHeartbeat();
      scheduleReconnect("The connection to the hub was lost");
    };
  }

  function startHeartbeat() {
    stopHeartbeat();
    state.heartbeat = setInterval(() => {
      if (state.heartbeatPending) {
        // The last heartbeat went unanswered: the link is dead.
        if (state.ws) state.ws.close();
        return;
      }
      state.heartbeatPending = nextRef();
      send([null, state.heartbeatPending, "phoenix", "heartbeat", {}]);
    }, HEARTBEAT_MS);
  }

  function stopHeartbeat() {
    clearInterval(state.heartbeat);
    state.heartbeat = null;
    state.heartbeatPending = null;
  }

  function decodeBroadcast(buffer) {
    // Kind 4: kind, topic length, event length, meta length, encoding, then
    // topic, event, meta and the payload.
    const bytes = new Uint8Array(buffer);
    if (bytes[0] !== 4 || bytes.length < 5) return null;
    const [, topicLength, eventLength, metaLength, encoding] = bytes;
    let offset = 5;
    const topic = decoder.decode(bytes.subarray(offset, offset + topicLength));
    offset += topicLength;
    const event = decoder.decode(bytes.subarray(offset, offset + eventLength));
    offset += eventLength + metaLength;
    const body = bytes.subarray(offset);
    return { topic, event, payload: encoding === 1 ? JSON.parse(decoder.decode(body)) : body };
  }

  function onFrame(data) {
    if (typeof data !== "string") {
      const message = decodeBroadcast(data);
      if (message && message.topic === TOPIC && message.event === "snapshot") render(message.payload);
      return;
    }
    const [, ref, topic, event, payload] = JSON.parse(data);
    if (topic === "phoenix" && event === "phx_reply") {
      if (ref === state.heartbeatPending) state.heartbeatPending = null;
      return;
    }
    if (topic !== TOPIC) return;
    if (event === "phx_reply" && ref === state.joinRef) {
      if (payload.status === "ok") {
        state.attempt = 0;
        hideBanner();
        document.body.classList.remove("offline");
        setStatus("live", "live");
      } else {
        const reason = (payload.response && payload.response.reason) || "join refused";
        forgetToken();
        showLogin(`The hub refused the command-center channel: ${reason}`);
      }
    } else if (event === "broadcast" && payload && payload.event === "snapshot") {
      render(payload.payload);
    } else if (event === "system" && payload && payload.status === "error") {
      showBanner(payload.message || "The channel was closed by the hub");
    } else if (event === "phx_close" || event === "phx_error") {
      // The channel ended (an expired token, a hub error): reconnecting
      // checks the token again and rejoins.
      if (state.ws) state.ws.close();
    }
  }

  // -- rendering --------------------------------------------------------------

  let networkChart = null;
  let kpiSpark = null;
  let detailMinutes = null;
  let detailSeconds = null;

  function render(snapshot) {
    if (!snapshot || typeof snapshot !== "object" || !snapshot.network) return;
    state.snapshot = snapshot;
    state.snapshots += 1;
    state.receivedAt = performance.now();
    state.offset = snapshot.time - Date.now() / 1000;
    document.body.dataset.snapshots = String(state.snapshots);
    if (state.ws && $("#status").dataset.state === "stale") setStatus("live", "live");
    renderKpis(snapshot);
    renderNetworkChart();
    renderOrgs(snapshot);
    renderFeed(snapshot);
    renderDetail();
    renderNodes(snapshot);
    setText($("#updated"), `updated ${fmtClock(snapshot.time)}`);
    const nodes = snapshot.nodes.length;
    setText($("#served-by"), `${nodes} node${nodes === 1 ? "" : "s"} · via ${snapshot.node}${snapshot.rebuilding ? " (rebuilding)" : ""}`);
  }

  function setKpi(name, value, alert = false) {
    const node = $(`[data-kpi="${name}"]`);
    const previous = state.kpis.get(name);
    setText(node, value);
    const card = node.closest(".kpi");
    if (previous !== undefined && previous !== value && node.classList.contains("value")) {
      card.classList.remove("changed");
      void card.offsetWidth; // restart the animation
      card.classList.add("changed");
    }
    if (node.classList.contains("value") || node.closest(".value")) card.classList.toggle("alert", alert);
    state.kpis.set(name, value);
  }

  function renderKpis(snapshot) {
    const net = snapshot.network;
    const perSecond = net.per_second || [];
    const lastMinutes = perSecond.slice(-120);
    const complete = perSecond.slice(-301, -1);
    setKpi("events_1m", fmtInt(net.events["1m"]));
    setKpi("events_5m", fmtInt(net.events["5m"]));
    setKpi("events_1h", fmtInt(net.events["1h"]));
    setKpi("rate", fmtRate(net.events["1m"] / 60));
    setKpi("peak", fmtInt(Math.max(0, ...complete)));
    setKpi("active_orgs", fmtInt(net.active_orgs));
    setKpi("orgs", fmtInt(net.orgs));
    setKpi("clients", fmtInt(net.clients));
    setKpi("users", fmtInt(net.users));
    setKpi("presence", fmtInt(net.presence));
    setKpi("delivered", fmtInt(net.delivered_1m));
    setKpi("refused", fmtInt(net.refused_1h), net.refused_1h > 0);
    setKpi("last_event", fmtAgo(net.since_last_event));
    if (!kpiSpark) {
      kpiSpark = sparkline(240, 60);
      $("#kpi-spark").append(kpiSpark.root);
    }
    kpiSpark.update(lastMinutes);
  }

  function renderNetworkChart() {
    const snapshot = state.snapshot;
    if (!snapshot) return;
    if (!networkChart) networkChart = new Chart($("#network-chart"), { bars: false, label: "events" });
    const net = snapshot.network;
    if (state.range === "seconds") networkChart.update(net.per_second, snapshot.time, 1);
    else networkChart.update(net.per_minute, snapshot.time, 60);
  }

  function sortValue(org, key) {
    switch (key) {
      case "org":
        return org.org;
      case "rate":
      case "1m":
        return org.events["1m"];
      case "5m":
        return org.events["5m"];
      case "1h":
        return org.events["1h"];
      case "delivered":
        return org.delivered_1m;
      case "refused":
        return org.refused_1h;
      case "last":
        return org.last_event_at || 0;
      default:
        return org[key] || 0;
    }
  }

  function sortedOrgs(orgs) {
    const { key, dir } = state.sort;
    const sign = dir === "asc" ? 1 : -1;
    return orgs.slice().sort((a, b) => {
      const va = sortValue(a, key);
      const vb = sortValue(b, key);
      if (va < vb) return -sign;
      if (va > vb) return sign;
      return a.org < b.org ? -1 : a.org > b.org ? 1 : 0;
    });
  }

  const COLUMNS = ["rate", "1m", "5m", "1h", "clients", "users", "presence", "delivered", "refused", "last"];

  function makeRow(org) {
    const tr = el("tr");
    tr.dataset.org = org;
    const name = el("td", "left");
    const chip = el("span", "org-chip");
    chip.style.background = orgColor(org);
    const where = el("span", "db-tag");
    name.append(chip, el("span", "org-name", org), where);
    const sparkCell = el("td", "left");
    const spark = sparkline(100, 24);
    sparkCell.append(spark.root);
    tr.append(name, sparkCell);
    const cells = {};
    for (const column of COLUMNS) {
      const td = el("td");
      td.dataset.col = column;
      cells[column] = td;
      tr.append(td);
    }
    tr.addEventListener("click", () => select(org));
    return { tr, spark, cells, where };
  }

  function cell(td, text, value, { hot = false, warn = false } = {}) {
    setText(td, text);
    td.classList.toggle("zero", value === 0);
    td.classList.toggle("hot", hot && value > 0);
    td.classList.toggle("warn", warn && value > 0);
  }

  function renderOrgs(snapshot) {
    const tbody = $("#orgs tbody");
    const filter = state.filter;
    const orgs = sortedOrgs(snapshot.orgs.filter((o) => !filter || o.org.toLowerCase().includes(filter)));
    const present = new Set();
    orgs.forEach((org, index) => {
      present.add(org.org);
      let row = state.rows.get(org.org);
      if (!row) {
        row = makeRow(org.org);
        state.rows.set(org.org, row);
      }
      const c = row.cells;
      // Where the org's log lives, unless the control database.
      setText(row.where, org.database && org.database !== "control" ? org.database : "");
      const rate = org.events["1m"] / 60;
      cell(c.rate, fmtRate(rate), org.events["1m"], { hot: true });
      cell(c["1m"], fmtInt(org.events["1m"]), org.events["1m"]);
      cell(c["5m"], fmtInt(org.events["5m"]), org.events["5m"]);
      cell(c["1h"], fmtInt(org.events["1h"]), org.events["1h"]);
      cell(c.clients, fmtInt(org.clients), org.clients);
      cell(c.users, fmtInt(org.users), org.users);
      cell(c.presence, fmtInt(org.presence), org.presence);
      cell(c.delivered, fmtInt(org.delivered_1m), org.delivered_1m);
      cell(c.refused, fmtInt(org.refused_1h), org.refused_1h, { warn: true });
      c.last.dataset.at = org.last_event_at === null ? "" : String(org.last_event_at);
      setText(c.last, fmtAgo(org.since_last_event));
      row.spark.update(org.per_second);
      row.tr.classList.toggle("selected", org.org === state.selected);
      if (tbody.children[index] !== row.tr) tbody.insertBefore(row.tr, tbody.children[index] || null);
    });
    for (const [org, row] of state.rows) {
      if (!present.has(org)) {
        row.tr.remove();
        state.rows.delete(org);
      }
    }
    $("#orgs-empty").hidden = orgs.length > 0;
    const omitted = snapshot.orgs_omitted ? ` (+${snapshot.orgs_omitted} quieter)` : "";
    setText($("#org-count"), `${orgs.length}${omitted}`);
    for (const th of $$("#orgs th[data-sort]")) {
      if (th.dataset.sort === state.sort.key) th.setAttribute("aria-sort", state.sort.dir === "asc" ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
  }

  function feedItem(event, { withOrg }) {
    const li = el("li");
    li.dataset.key = `${event.org}:${event.seq}:${event.id}`;
    const time = el("span", "time", fmtClock(event.at));
    const what = el("span", "what");
    if (withOrg) {
      const chip = el("span", "org-chip");
      chip.style.background = orgColor(event.org);
      const org = el("span", "org", event.org);
      org.addEventListener("click", () => select(event.org));
      what.append(chip, org);
    }
    what.append(el("span", "type", event.type));
    const seq = el("span", "seq", `#${event.seq}`);
    const preview = el("span", "preview", event.preview);
    li.append(time, what, seq, preview);
    return li;
  }

  function renderFeed(snapshot) {
    const feed = $("#feed");
    const first = state.feedKeys.size === 0;
    const recent = snapshot.recent || [];
    for (let i = recent.length - 1; i >= 0; i -= 1) {
      const event = recent[i];
      const key = `${event.org}:${event.seq}:${event.id}`;
      if (state.feedKeys.has(key)) continue;
      state.feedKeys.add(key);
      const li = feedItem(event, { withOrg: true });
      if (!first) li.classList.add("new");
      feed.prepend(li);
    }
    while (feed.children.length > FEED_MAX) {
      state.feedKeys.delete(feed.lastElementChild.dataset.key);
      feed.lastElementChild.remove();
    }
    $("#feed-empty").hidden = feed.children.length > 0;
  }

  function select(org) {
    state.selected = state.selected === org ? null : org;
    renderDetail();
    for (const [name, row] of state.rows) row.tr.classList.toggle("selected", name === state.selected);
    if (state.selected) $("#detail").scrollIntoView({ behavior: "smooth", block: "nearest" });
  }

  function stat(key, value) {
    const box = el("div", "stat");
    box.append(el("div", "v", value), el("div", "k", key));
    return box;
  }

  function renderDetail() {
    const panel = $("#detail");
    const snapshot = state.snapshot;
    if (!state.selected || !snapshot) {
      panel.hidden = true;
      return;
    }
    panel.hidden = false;
    const name = state.selected;
    const org = snapshot.orgs.find((o) => o.org === name);
    panel.dataset.org = name;
    $("#detail-chip").style.background = orgColor(name);
    setText($("#detail-org"), name);
    setText($("#detail-seq"), org ? `${fmtInt(org.seq)} events in total` : "no activity in the last hour");
    const zeros = (n) => new Array(n).fill(0);
    const o = org || {
      events: { "1m": 0, "5m": 0, "1h": 0 },
      per_second: zeros(60),
      per_minute: zeros(60),
      types: {},
      user_ids: [],
      recent: [],
      clients: 0,
      users: 0,
      presence: 0,
      delivered_1m: 0,
      refused_1h: 0,
      since_last_event: null,
    };
    $("#detail-stats").replaceChildren(
      stat("ev/s", fmtRate(o.events["1m"] / 60)),
      stat("1 min", fmtInt(o.events["1m"])),
      stat("5 min", fmtInt(o.events["5m"])),
      stat("1 hour", fmtInt(o.events["1h"])),
      stat("clients", fmtInt(o.clients)),
      stat("users", fmtInt(o.users)),
      stat("present", fmtInt(o.presence)),
      stat("delivered / min", fmtInt(o.delivered_1m)),
      stat("refused · 1 h", fmtInt(o.refused_1h)),
      stat("last event", fmtAgo(o.since_last_event)),
    );
    if (!detailMinutes) detailMinutes = new Chart($("#detail-minutes"), { bars: true, label: "events" });
    if (!detailSeconds) detailSeconds = new Chart($("#detail-seconds"), { bars: false, label: "events" });
    detailMinutes.update(o.per_minute, snapshot.time, 60);
    detailSeconds.update(o.per_second, snapshot.time, 1);

    const types = Object.entries(o.types);
    const top = types.length ? types[0][1] : 1;
    const typeList = $("#detail-types");
    typeList.replaceChildren(
      ...types.slice(0, 12).map(([type, count]) => {
        const li = el("li");
        const track = el("div", "track");
        const fill = el("div", "fill");
        fill.style.width = `${Math.max(2, (count / top) * 100)}%`;
        track.append(fill);
        li.append(el("span", "name", type), el("span", "n", fmtInt(count)), track);
        return li;
      }),
    );
    if (!types.length) typeList.append(el("li", "muted", "no events in the last hour"));

    const users = $("#detail-users");
    const shown = o.user_ids.slice(0, 40);
    users.replaceChildren(...shown.map((user) => el("li", "", user)));
    if (o.users > shown.length) users.append(el("li", "more", `+${fmtInt(o.users - shown.length)} more`));
    if (!o.users) users.append(el("li", "more", "nobody connected"));

    $("#detail-recent").replaceChildren(...o.recent.map((event) => feedItem(event, { withOrg: false })));
  }

  function health(node) {
    if (node.age !== null && node.age > 5) return ["down", "silent"];
    const databasesDown = node.databases_down || [];
    if (databasesDown.length) return ["degraded", `database ${databasesDown.join(", ")} down`];
    if (!node.engine_ready || !node.store_ready || node.redis === false) {
      const parts = [];
      if (!node.engine_ready) parts.push("engine");
      if (!node.store_ready) parts.push("store");
      if (node.redis === false) parts.push("redis");
      return ["degraded", `${parts.join(", ")} down`];
    }
    if (node.loop_lag_ms > 100) return ["degraded", "slow loop"];
    if (!node.rebuilt) return ["degraded", "rebuilding"];
    return ["ok", "healthy"];
  }

  function renderNodes(snapshot) {
    const rows = snapshot.nodes.map((node) => {
      const tr = el("tr");
      tr.dataset.node = node.node;
      const name = el("td", "left");
      name.append(el("span", "org-name", node.node));
      if (node.self) name.append(el("span", "self-tag", "serving this page"));
      const [level, label] = health(node);
      const status = el("td", "left");
      status.append(el("span", `health ${level}`, label));
      const numbers = [
        fmtDuration(node.uptime),
        fmtInt(node.clients),
        fmtInt(node.users),
        fmtInt(node.subscriptions),
        fmtInt(node.topics),
        fmtInt(node.delivered_1m),
        node.loop_lag_ms === null || node.loop_lag_ms === undefined ? "—" : `${node.loop_lag_ms} ms`,
        fmtBytes(node.rss_bytes),
        node.age === null ? "—" : `${node.age.toFixed(1)} s`,
      ];
      tr.append(name, status, ...numbers.map((text) => el("td", "", text)));
      return tr;
    });
    $("#nodes tbody").replaceChildren(...rows);
  }

  // Every second: relative times, and whether updates still arrive.
  function tick() {
    const snapshot = state.snapshot;
    if (!snapshot) return;
    const now = serverNow();
    for (const row of state.rows.values()) {
      const at = row.cells.last.dataset.at;
      if (at) setText(row.cells.last, fmtAgo(Math.max(0, now - Number(at))));
    }
    if (snapshot.network.last_event_at) setKpi("last_event", fmtAgo(Math.max(0, now - snapshot.network.last_event_at)));
    if (state.ws && $("#status").dataset.state === "live") {
      const silent = (performance.now() - state.receivedAt) / 1000;
      const expected = 1 / (snapshot.rate || 1);
      if (silent > Math.max(5, 3 * expected)) {
        setStatus("stale", `no update for ${Math.floor(silent)} s`);
      }
    }
  }

  // -- history (GET /api/mother/history) -----------------------------------------

  let historyChart = null;
  let historyOrgChart = null;

  function historyUrl(format) {
    const url = new URL("api/mother/history", location.href);
    url.searchParams.set("range", state.historyRange);
    if (state.historyOrg) url.searchParams.set("org", state.historyOrg);
    if (format) url.searchParams.set("format", format);
    return url;
  }

  async function loadHistory() {
    clearTimeout(state.historyTimer);
    if (!state.token || state.stopped) return;
    const asked = `${state.historyRange}|${state.historyOrg || ""}`;
    let view = null;
    try {
      const response = await fetch(historyUrl(), {
        headers: { Authorization: `Bearer ${state.token}` },
        cache: "no-store",
      });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      view = await response.json();
    } catch (error) {
      const note = $("#history-error");
      note.textContent = `The history cannot be read (${error.message}); retrying in a minute.`;
      note.hidden = false;
    }
    loadProjections();
    if (view && asked === `${state.historyRange}|${state.historyOrg || ""}`) {
      $("#history-error").hidden = true;
      state.history = view;
      renderHistory();
    }
    state.historyTimer = setTimeout(loadHistory, HISTORY_REFRESH_MS);
  }

  function renderHistory() {
    const view = state.history;
    if (!view) return;
    if (!historyChart) historyChart = new Chart($("#history-chart"), { bars: true, label: "events" });
    historyChart.update(view.network, view.end, view.bucket);
    const per = view.bucket >= 3600 ? `${view.bucket / 3600} h` : `${view.bucket / 60} min`;
    setText(
      $("#history-summary"),
      `${fmtInt(view.events)} events · ${fmtInt(view.orgs.length)} orgs · per ${per} · ${view.source === "sql" ? "from the rollups" : "since this node started"}`,
    );
    const panel = $("#history-org");
    if (view.org) {
      panel.hidden = false;
      setText($("#history-org-name"), view.org.org);
      $("#history-org-chip").style.background = orgColor(view.org.org);
      if (!historyOrgChart) historyOrgChart = new Chart($("#history-org-chart"), { bars: true, label: "events" });
      historyOrgChart.update(view.org.series, view.end, view.bucket);
    } else {
      panel.hidden = true;
    }
    const rows = view.orgs.map((item) => {
      const tr = el("tr");
      tr.dataset.org = item.org;
      tr.classList.toggle("selected", item.org === state.historyOrg);
      const name = el("td", "left");
      const chip = el("span", "org-chip");
      chip.style.background = orgColor(item.org);
      name.append(chip, document.createTextNode(` ${item.org}`));
      const last = item.last_event_at ? new Date(item.last_event_at * 1000).toISOString().slice(0, 19).replace("T", " ") : "—";
      const cells = [
        name,
        el("td", null, fmtInt(item.events)),
        el("td", null, fmtInt(item.users)),
        el("td", null, last),
      ];
      cells[1].dataset.col = "events";
      cells[2].dataset.col = "users";
      tr.append(...cells);
      tr.addEventListener("click", () => {
        state.historyOrg = state.historyOrg === item.org ? null : item.org;
        loadHistory();
      });
      return tr;
    });
    $("#history-orgs tbody").replaceChildren(...rows);
    $("#history-empty").hidden = view.orgs.length > 0;
    document.body.dataset.history = view.range;
  }

  async function loadProjections() {
    if (!state.token || state.stopped) return;
    let body = null;
    try {
      const response = await fetch(new URL("api/mother/projections", location.href), {
        headers: { Authorization: `Bearer ${state.token}` },
        cache: "no-store",
      });
      if (response.ok) body = await response.json();
    } catch (_) {
      // shown again at the next refresh
    }
    const panel = $("#projections");
    if (!body || !body.projections) {
      panel.hidden = true;
      return;
    }
    panel.hidden = false;
    const rows = body.projections.map((p) => {
      const tr = el("tr");
      tr.dataset.projection = p.name;
      tr.classList.toggle("alert-row", p.stopped > 0);
      const cells = [
        el("td", "left", p.name),
        el("td", "left", `${p.mode} → ${p.schema}`),
        el("td", null, fmtInt(p.behind)),
        el("td", null, fmtInt(p.lag)),
        el("td", null, fmtInt(p.max_lag)),
        el("td", p.stopped > 0 ? "warn" : null, fmtInt(p.stopped)),
      ];
      cells[5].dataset.col = "stopped";
      tr.append(...cells);
      return tr;
    });
    $("#projections-table tbody").replaceChildren(...rows);
    const stopped = body.stopped.map((s) => {
      const li = el("li", "error");
      li.textContent = `${s.projection} stopped for ${s.org} at seq ${s.error_seq}: ${s.error}`;
      return li;
    });
    $("#projections-stopped").replaceChildren(...stopped);
    document.body.dataset.projections = String(body.projections.length);
  }

  async function exportHistory() {
    const response = await fetch(historyUrl("csv"), {
      headers: { Authorization: `Bearer ${state.token}` },
      cache: "no-store",
    });
    if (!response.ok) return;
    const link = el("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = `hub-history-${state.historyRange}.csv`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  // -- wiring -----------------------------------------------------------------

  function init() {
    $("#login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("#token-input").value.trim();
      if (!token) return;
      $("#token-input").value = "";
      saveToken(token);
      begin(token);
    });
    $("#sign-out").addEventListener("click", () => {
      forgetToken();
      showLogin();
    });
    $("#detail-close").addEventListener("click", () => select(state.selected));
    $("#org-filter").addEventListener("input", (event) => {
      state.filter = event.target.value.trim().toLowerCase();
      if (state.snapshot) renderOrgs(state.snapshot);
    });
    for (const th of $$("#orgs th[data-sort]")) {
      th.addEventListener("click", () => {
        const key = th.dataset.sort;
        const dir = state.sort.key === key ? (state.sort.dir === "desc" ? "asc" : "desc") : key === "org" ? "asc" : "desc";
        state.sort = { key, dir };
        try {
          localStorage.setItem(SORT_KEY, JSON.stringify(state.sort));
        } catch (_) {
          // not kept
        }
        if (state.snapshot) renderOrgs(state.snapshot);
      });
    }
    for (const button of $$("[data-range]")) {
      button.addEventListener("click", () => {
        state.range = button.dataset.range;
        for (const other of $$("[data-range]")) other.setAttribute("aria-pressed", String(other === button));
        renderNetworkChart();
      });
    }
    for (const button of $$("[data-history]")) {
      button.addEventListener("click", () => {
        state.historyRange = button.dataset.history;
        for (const other of $$("[data-history]")) other.setAttribute("aria-pressed", String(other === button));
        loadHistory();
      });
    }
    $("#history-csv").addEventListener("click", exportHistory);
    $("#history-org-close").addEventListener("click", () => {
      state.historyOrg = null;
      loadHistory();
    });
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        renderNetworkChart();
        renderDetail();
        renderHistory();
      }, 150);
    });
    setInterval(tick, 1000);

    // A token in the fragment (never sent to the server) wins, then the
    // one kept from last time.  The fragment is removed from the address bar.
    const fragment = new URLSearchParams(location.hash.slice(1));
    let token = fragment.get("token");
    if (token) {
      saveToken(token);
      history.replaceState(null, "", location.pathname + location.search);
    } else {
      token = loadToken();
    }
    if (token) begin(token);
    else showLogin();
  }

  init();
})();
