// parley demo chat: a plain page on top of the SDK (/sdk/parley.js). No framework.
//
// Query parameters (for trying the fallbacks by hand, and for the browser tests):
//   ?transports=sse,poll   the transports the SDK may use, in order
//   ?encoding=json         WebSocket encoding (default proto)
//   ?name=alice            sign in at once (development mode only)
//   ?ping=ms&pong=ms&probe=ms&connectTimeout=ms   SDK timing options (pingIntervalMs,
//                          pongTimeoutMs, probeWebSocketMs, connectTimeoutMs)
import { Parley } from "/sdk/parley.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const devMode = document.querySelector('meta[name="parley-dev-tokens"]')?.content === "true";
const TRANSPORT_LABEL = { websocket: "WebSocket", sse: "SSE", poll: "long-poll" };

/** @type {Parley | undefined} */
let client;
let me = "";
let active = ""; // the room on screen
const rooms = new Map(); // room -> { room, dmPeer, unread, lastSeq, readSeq, messages: Map<seq, msg>, oldest, more }
const pending = new Map(); // clientMsgId -> { room, body }
const presence = new Map(); // user -> online
const typingUntil = new Map(); // room -> Map<user, until>

// ---------------------------------------------------------------- sign in

if (devMode) $("dev-banner").hidden = false;
else {
  $("name-label").hidden = $("name").hidden = true;
  $("name").required = false;
  $("token-label").hidden = $("token").hidden = false;
  $("token").required = true;
}

async function devToken(user) {
  const r = await fetch("/api/v1/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user }),
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.message || `HTTP ${r.status}`);
  return body.token;
}

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("login-error").textContent = "";
  try {
    if (devMode) await start($("name").value.trim(), () => devToken($("name").value.trim()));
    else {
      const token = $("token").value.trim();
      await start("", () => token);
    }
  } catch (err) {
    $("login-error").textContent = String(err.message || err);
  }
});

$("logout").addEventListener("click", () => {
  client?.close();
  sessionStorage.removeItem("parley.demo.name");
  location.search = "";
});

async function start(name, getToken) {
  await getToken(); // fail here (bad name, dev mode off) rather than inside the SDK
  me = name;
  if (name) sessionStorage.setItem("parley.demo.name", name);
  const transports = (params.get("transports") || "websocket,sse,poll").split(",").filter(Boolean);
  const ms = (name) => (params.has(name) ? Number(params.get(name)) : undefined);
  client = new Parley(location.origin, {
    getToken,
    transports,
    encoding: params.get("encoding") === "json" ? "json" : "proto",
    pingIntervalMs: ms("ping"),
    pongTimeoutMs: ms("pong"),
    probeWebSocketMs: ms("probe"),
    connectTimeoutMs: ms("connectTimeout"),
  });
  window.parley = client; // for the console and the browser tests
  wire(client);
  $("login").hidden = true;
  $("app").hidden = false;
  showTransport();
  client.join("lobby").then(() => {
    if (!active) open("lobby");
  }, report);
}

const autoName = params.get("name") || sessionStorage.getItem("parley.demo.name");
if (devMode && autoName) {
  $("name").value = autoName;
  start(autoName, () => devToken(autoName)).catch((e) => ($("login-error").textContent = String(e.message || e)));
}

function report(err) {
  console.warn("parley:", err);
}

// ---------------------------------------------------------------- SDK events

function wire(c) {
  c.on("state", showTransport);
  c.on("connected", (ev) => {
    window.connectedAt ??= performance.now(); // ms since navigation start (benchmarks)
    me = ev.userId;
    $("me-name").textContent = me;
    for (const r of ev.rooms) {
      const room = roomOf(r.room, r.dmPeer);
      room.unread = r.unread;
      room.lastSeq = r.lastSeq;
      room.readSeq = r.readSeq;
    }
    renderRooms();
    if (active) markRead(active);
  });
  c.on("message", (m) => {
    const room = roomOf(m.room, peerOf(m.room));
    room.messages.set(m.seq, m);
    room.lastSeq = Math.max(room.lastSeq, m.seq);
    if (room.oldest === 0) room.oldest = m.seq;
    pending.delete(m.clientMsgId);
    if (m.sender !== me && (m.room !== active || document.hidden)) room.unread += 1;
    stopTyping(m.room, m.sender);
    if (m.room === active) {
      renderMessages();
      if (!document.hidden) markRead(m.room);
    }
    renderRooms();
  });
  c.on("receipt", (r) => {
    if (r.user !== me) return;
    const room = roomOf(r.room, peerOf(r.room));
    room.readSeq = Math.max(room.readSeq, r.seq);
    room.unread = r.unread;
    renderRooms();
  });
  c.on("typing", (t) => {
    let users = typingUntil.get(t.room);
    if (!users) typingUntil.set(t.room, (users = new Map()));
    users.set(t.user, Date.now() + 4000);
    renderTyping();
    setTimeout(renderTyping, 4100);
  });
  c.on("presence", (p) => {
    presence.set(p.user, p.online);
    renderRooms();
    renderSub();
  });
  c.on("membership", (m) => {
    if (m.user === me && m.action !== "left") {
      roomOf(m.room, peerOf(m.room));
      renderRooms();
    }
    if (m.room === active) loadMembers(m.room);
  });
  c.on("announcement", (a) => {
    const room = roomOf(active || "lobby", "");
    room.notice = a.body;
    renderMessages();
  });
}

document.addEventListener("visibilitychange", () => {
  if (!document.hidden && active) markRead(active);
});

function showTransport() {
  const el = $("transport");
  const state = client?.state ?? "connecting";
  const t = client?.transport ?? "";
  el.dataset.state = state;
  el.dataset.transport = t;
  el.textContent =
    state === "connected" ? `${TRANSPORT_LABEL[t] ?? t}${t === "websocket" ? ` · ${params.get("encoding") === "json" ? "json" : "protobuf"}` : ""}` : state;
  el.title = state === "connected" ? `connected over ${TRANSPORT_LABEL[t] ?? t}` : state;
}

// ---------------------------------------------------------------- rooms

function peerOf(room) {
  if (!room.startsWith("dm:")) return "";
  const [, a, b] = room.split(":");
  return a === me ? b : a;
}

function dmRoom(user) {
  return `dm:${[me, user].sort().join(":")}`;
}

function roomOf(name, dmPeer) {
  let r = rooms.get(name);
  if (!r) {
    r = { room: name, dmPeer: dmPeer || "", unread: 0, lastSeq: 0, readSeq: 0, messages: new Map(), oldest: 0, more: false, loaded: false };
    rooms.set(name, r);
    if (r.dmPeer) watchPresence([r.dmPeer]);
  }
  return r;
}

async function watchPresence(users) {
  if (!client) return;
  try {
    for (const p of await client.presence(users)) presence.set(p.user, p.online);
    renderRooms();
    renderSub();
  } catch (e) {
    report(e);
  }
}

function renderRooms() {
  const groups = { rooms: $("rooms"), dms: $("dms") };
  groups.rooms.replaceChildren();
  groups.dms.replaceChildren();
  const sorted = [...rooms.values()].sort((a, b) => a.room.localeCompare(b.room));
  for (const r of sorted) {
    const li = document.createElement("li");
    li.dataset.room = r.room;
    if (r.room === active) li.classList.add("active");
    if (r.dmPeer) {
      const dot = document.createElement("span");
      dot.className = "dot" + (presence.get(r.dmPeer) ? " online" : "");
      dot.title = presence.get(r.dmPeer) ? "online" : "offline";
      li.append(dot);
    }
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = r.dmPeer ? r.dmPeer : `# ${r.room}`;
    li.append(name);
    if (r.unread > 0 && r.room !== active) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = String(r.unread);
      li.append(badge);
    }
    li.addEventListener("click", () => open(r.room));
    (r.dmPeer ? groups.dms : groups.rooms).append(li);
  }
}

async function open(name) {
  active = name;
  $("sidebar").classList.remove("open");
  const r = roomOf(name, peerOf(name));
  $("room-title").textContent = r.dmPeer ? `@ ${r.dmPeer}` : `# ${name}`;
  renderRooms();
  renderMessages();
  renderTyping();
  renderSub();
  if (!r.loaded) {
    r.loaded = true;
    try {
      const page = await client.history(name, { limit: 30 });
      addPage(r, page);
    } catch (e) {
      if (e.code !== "ERROR_CODE_NOT_FOUND") report(e); // a DM not started yet
    }
  }
  renderMessages(true);
  markRead(name);
  loadMembers(name);
  $("text").focus();
}

function addPage(r, page) {
  for (const m of page.messages) {
    r.messages.set(m.seq, m);
    r.lastSeq = Math.max(r.lastSeq, m.seq);
  }
  if (page.messages.length) {
    const first = page.messages[0].seq;
    r.oldest = r.oldest ? Math.min(r.oldest, first) : first;
    r.more = page.more;
  }
}

async function loadMembers(name) {
  const r = rooms.get(name);
  if (!r || r.dmPeer) return;
  try {
    r.members = await client.members(name);
    await watchPresence(r.members.filter((u) => u !== me).slice(0, 50));
  } catch (e) {
    report(e);
  }
  renderSub();
}

function renderSub() {
  const r = rooms.get(active);
  const sub = $("room-sub");
  if (!r) return (sub.textContent = "");
  if (r.dmPeer) sub.textContent = presence.get(r.dmPeer) ? "online" : "offline";
  else if (r.members) {
    const online = r.members.filter((u) => u === me || presence.get(u)).length;
    sub.textContent = `${r.members.length} members, ${online} online`;
  } else sub.textContent = "";
}

async function markRead(name) {
  const r = rooms.get(name);
  if (!r || !client || document.hidden) return;
  r.unread = 0;
  renderRooms();
  if (r.lastSeq > r.readSeq) {
    r.readSeq = r.lastSeq;
    client.markRead(name, r.lastSeq).catch(report);
  }
}

$("join-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const name = $("join-input").value.trim();
  if (!name) return;
  try {
    await client.join(name);
    $("join-input").value = "";
    roomOf(name, "");
    open(name);
  } catch (err) {
    alert(err.message);
  }
});

$("dm-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const user = $("dm-input").value.trim();
  if (!user || user === me) return;
  $("dm-input").value = "";
  roomOf(dmRoom(user), user);
  open(dmRoom(user));
});

$("menu").addEventListener("click", () => $("sidebar").classList.toggle("open"));

// ---------------------------------------------------------------- messages

function renderMessages(scrollToEnd) {
  const box = $("messages");
  const atEnd = scrollToEnd || box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const r = rooms.get(active);
  const list = $("list");
  list.replaceChildren();
  if (!r) return;
  $("older").hidden = !r.more;
  const seqs = [...r.messages.keys()].sort((a, b) => a - b);
  for (const seq of seqs) list.append(messageItem(r.messages.get(seq), false));
  for (const [id, p] of pending) {
    if (p.room === active) list.append(messageItem({ sender: me, body: p.body, clientMsgId: id, ts: p.ts, seq: 0 }, true));
  }
  if (r.notice) {
    const li = document.createElement("li");
    li.className = "msg notice";
    li.textContent = `📣 ${r.notice}`;
    list.append(li);
  }
  if (atEnd) box.scrollTop = box.scrollHeight;
}

function messageItem(m, isPending) {
  const li = document.createElement("li");
  li.className = "msg" + (m.sender === me ? " mine" : "") + (isPending ? " pending" : "");
  if (m.seq) li.dataset.seq = String(m.seq);
  li.dataset.cmid = m.clientMsgId;
  const meta = document.createElement("div");
  meta.className = "meta";
  const sender = document.createElement("span");
  sender.className = "sender";
  sender.textContent = m.sender;
  const time = document.createElement("span");
  time.textContent = isPending ? "sending…" : new Date(m.ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  meta.append(sender, time);
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = m.body;
  li.append(meta, body);
  return li;
}

$("older").addEventListener("click", loadOlder);
$("messages").addEventListener("scroll", () => {
  if ($("messages").scrollTop < 20) loadOlder();
});

let loadingOlder = false;
async function loadOlder() {
  const r = rooms.get(active);
  if (!r || !r.more || loadingOlder) return;
  loadingOlder = true;
  const box = $("messages");
  const fromBottom = box.scrollHeight - box.scrollTop;
  try {
    addPage(r, await client.history(r.room, { before: r.oldest, limit: 30 }));
    renderMessages();
    box.scrollTop = box.scrollHeight - fromBottom; // keep the view where it was
  } catch (e) {
    report(e);
  } finally {
    loadingOlder = false;
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const body = $("text").value.trim();
  if (!body || !active) return;
  $("text").value = "";
  const r = rooms.get(active);
  const clientMsgId = crypto.randomUUID();
  pending.set(clientMsgId, { room: active, body, ts: Date.now() });
  renderMessages(true);
  const sent = r.dmPeer ? client.sendDirect(r.dmPeer, body, { clientMsgId }) : client.send(active, body, { clientMsgId });
  Promise.resolve(sent).catch((err) => {
    pending.delete(clientMsgId);
    renderMessages();
    alert(`not sent: ${err.message}`);
  });
});

let lastTyping = 0;
$("text").addEventListener("input", () => {
  const r = rooms.get(active);
  if (!r || !client || Date.now() - lastTyping < 2500 || !$("text").value) return;
  if (r.dmPeer && r.messages.size === 0) return; // the DM room exists after the first message
  lastTyping = Date.now();
  client.typing(active);
});

function stopTyping(room, user) {
  typingUntil.get(room)?.delete(user);
  renderTyping();
}

function renderTyping() {
  const users = [...(typingUntil.get(active) ?? new Map()).entries()].filter(([, until]) => until > Date.now()).map(([u]) => u);
  $("typing").textContent = users.length === 0 ? "" : users.length === 1 ? `${users[0]} is typing…` : `${users.join(", ")} are typing…`;
}
