// The switchboard console: one pane per entry of config.json, each a WebSocket
// client of the reference application (docs/CLIENT-PROTOCOL.md) on one node.
//
// Everything that comes from the network or the user is put in the page as
// text (textContent, append of strings), never parsed as HTML: a message
// reading "<img onerror=...>" shows as those characters.
"use strict";

// Default user ids, one per pane, so that two panes can talk at once.
const NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"];

// Builds an element; string children become text nodes.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  e.append(...children);
  return e;
}

function clock() {
  return new Date().toLocaleTimeString([], { hour12: false });
}

// The WebSocket URL of an endpoint: its port on the host the page came from
// (or the page's own port), so that the console works under any host name.
function socketUrl(endpoint, uid, group) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const host = endpoint.port ? `${location.hostname}:${endpoint.port}` : location.host;
  const q = new URLSearchParams({ uid });
  if (group) q.set("group", group);
  return `${scheme}//${host}${endpoint.path}?${q}`;
}

class Pane {
  constructor(index, endpoint, peers) {
    this.endpoint = endpoint;
    this.ws = null;
    this.node = "";
    const me = NAMES[index % NAMES.length];
    const peer = NAMES[(index + 1) % Math.max(peers, 2)];

    this.status = el("span", { class: "status", "data-state": "off" }, "disconnected");
    this.nodeName = el("span", { class: "node" });
    this.uid = el("input", { class: "uid", name: "uid", value: me, required: "", autocomplete: "off", "aria-label": "user id" });
    this.group = el("input", { class: "group", name: "group", value: "lobby", placeholder: "optional", autocomplete: "off", "aria-label": "group" });
    this.connectBtn = el("button", { class: "connect", type: "submit" }, "connect");
    const connect = el("form", { class: "row" },
      el("label", {}, "user ", this.uid),
      el("label", {}, "group ", this.group),
      this.connectBtn);
    connect.addEventListener("submit", (e) => { e.preventDefault(); this.toggle(); });

    this.kind = el("select", { class: "kind", "aria-label": "send to" },
      el("option", { value: "user" }, "to user"),
      el("option", { value: "group" }, "to group"),
      el("option", { value: "all" }, "to everyone"));
    this.to = el("input", { class: "to", value: peer, autocomplete: "off", "aria-label": "recipient" });
    this.text = el("input", { class: "text", placeholder: "message", autocomplete: "off", "aria-label": "message" });
    this.sendBtn = el("button", { class: "send", type: "submit" }, "send");
    this.kind.addEventListener("change", () => {
      const k = this.kind.value;
      this.to.hidden = k === "all";
      if (k === "group") this.to.value = this.group.value || "lobby";
      if (k === "user") this.to.value = peer;
    });
    const send = el("form", { class: "row" }, this.kind, this.to, this.text, this.sendBtn);
    send.addEventListener("submit", (e) => { e.preventDefault(); this.send(); });

    this.who = el("input", { class: "who", value: peer, autocomplete: "off", "aria-label": "user to look up" });
    this.onlineBtn = el("button", { class: "online", type: "submit" }, "online?");
    const online = el("form", { class: "row ask" }, el("label", {}, "is user ", this.who), this.onlineBtn);
    online.addEventListener("submit", (e) => {
      e.preventDefault();
      this.request({ op: "online", uid: this.who.value.trim() });
    });
    this.which = el("input", { class: "which", value: "lobby", autocomplete: "off", "aria-label": "group to count" });
    this.countBtn = el("button", { class: "count", type: "submit" }, "how many?");
    const count = el("form", { class: "row ask" }, el("label", {}, "in group ", this.which), this.countBtn);
    count.addEventListener("submit", (e) => {
      e.preventDefault();
      this.request({ op: "group_count", group: this.which.value.trim() });
    });

    this.log = el("ol", { class: "log", "aria-live": "polite" });
    this.root = el("section", { class: "pane", "data-pane": String(index) },
      el("header", {}, el("h2", {}, endpoint.label), this.status, this.nodeName),
      connect, send, online, count, this.log);
    this.setConnected(false);
  }

  setConnected(on) {
    for (const b of [this.sendBtn, this.onlineBtn, this.countBtn]) b.disabled = !on;
    this.uid.disabled = this.group.disabled = this.ws !== null;
    this.connectBtn.textContent = this.ws ? "disconnect" : "connect";
  }

  toggle() {
    if (this.ws) {
      this.ws.close(1000, "bye");
      return;
    }
    const uid = this.uid.value.trim();
    if (!uid) return;
    const ws = new WebSocket(socketUrl(this.endpoint, uid, this.group.value.trim()));
    this.ws = ws;
    this.welcomed = false;
    this.status.dataset.state = "connecting";
    this.status.textContent = "connecting";
    this.setConnected(false);
    ws.onmessage = (ev) => this.receive(ev.data);
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.node = "";
      this.nodeName.textContent = "";
      this.status.dataset.state = "off";
      this.status.textContent = "disconnected";
      this.system(this.welcomed
        ? `closed (${ev.code}${ev.reason ? " " + ev.reason : ""})`
        : "could not connect (is the node running? is the user id set?)", "error");
      this.setConnected(false);
    };
  }

  receive(raw) {
    let m = null;
    try { m = JSON.parse(raw); } catch (_) { /* pushed data need not be JSON */ }
    if (m === null || typeof m !== "object" || Array.isArray(m)) {
      this.entry("raw", [el("span", { class: "body" }, String(raw))]);
      return;
    }
    switch (m.op) {
      case "welcome":
        this.welcomed = true;
        this.node = String(m.node);
        this.status.dataset.state = "on";
        this.status.textContent = `${this.uid.value.trim()} on`;
        this.nodeName.textContent = this.node;
        this.system(`connected to node ${m.node} as connection ${m.conn}`);
        this.setConnected(true);
        return;
      case "online":
        this.system(`${m.uid} is ${m.online ? "online" : "offline"}${partial(m)}`, "answer");
        return;
      case "group_count":
        this.system(`group ${m.group}: ${m.count} connection${m.count === 1 ? "" : "s"}${partial(m)}`, "answer");
        return;
      case "error":
        this.system(`error: ${m.reason}`, "error");
        return;
    }
    if (typeof m.text === "string") {
      const from = `${m.from ?? "?"} on ${m.node ?? "?"}`;
      this.entry("msg", [
        el("span", { class: "from" }, from),
        el("span", { class: "via" }, `via ${this.node}`),
        el("span", { class: "body" }, m.text),
      ]);
    } else {
      this.entry("raw", [el("span", { class: "body" }, raw)]);
    }
  }

  send() {
    const text = this.text.value;
    if (!text) return;
    const data = JSON.stringify({ from: this.uid.value.trim(), node: this.node, text });
    const to = this.to.value.trim();
    let req;
    switch (this.kind.value) {
      case "user": req = { op: "to_user", uid: to, data }; break;
      case "group": req = { op: "to_group", group: to, data }; break;
      default: req = { op: "to_all", data };
    }
    if (req.op !== "to_all" && !to) return;
    if (this.request(req)) {
      const where = req.op === "to_all" ? "everyone" : `${this.kind.value} ${to}`;
      this.entry("sent", [el("span", { class: "from" }, `to ${where}`), el("span", { class: "body" }, text)]);
      this.text.value = "";
    }
  }

  request(req) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(req));
    return true;
  }

  system(text, kind) {
    this.entry(kind || "system", [el("span", { class: "body" }, text)]);
  }

  entry(kind, parts) {
    const li = el("li", { class: kind }, el("time", {}, clock()), ...parts);
    this.log.append(li);
    // Bounded: a long session does not grow the page without end.
    while (this.log.childElementCount > 500) this.log.firstElementChild.remove();
    this.log.scrollTop = this.log.scrollHeight;
  }
}

// " (partial: n1 did not answer)" for an answer some nodes did not contribute to.
function partial(m) {
  return m.complete === false ? ` (partial: ${(m.missing || []).join(", ")} did not answer)` : "";
}

async function main() {
  const panes = document.getElementById("panes");
  let config;
  try {
    const r = await fetch("config.json", { cache: "no-store" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    config = await r.json();
  } catch (e) {
    panes.append(el("p", { class: "error" }, `cannot load config.json: ${e.message}`));
    return;
  }
  document.title = config.title;
  document.getElementById("title").textContent = config.title;
  document.getElementById("about").textContent = config.about || "";
  const list = config.endpoints || [];
  list.forEach((endpoint, i) => panes.append(new Pane(i, endpoint, list.length).root));
  panes.dataset.ready = "true";
}

main();
