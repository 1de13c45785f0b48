// parley demo chat: a plain page on top of the SDK (/sdk/parley.js). No framework.
//
// Query parameters (for trying the fallbacks by hand, and for the browser tests):
//   ?transports=sse,poll   the transports the SDK may use, in order
//   ?encoding=json         WebSocket encoding (default proto)
//   ?name=alice            sign in at once (development mode only)
//   ?ping=ms&pong=ms&probe=ms&connectTimeout=ms   SDK timing options (pingIntervalMs,
//                          pongTimeoutMs, probeWebSocketMs, connectTimeoutMs)
//   ?browsePage=n          public rooms per page in the room browser (default 25)
//   ?webTransport=prefer   WebTransport choice: auto (default), prefer, never
//   ?certHash=hex          SHA-256 of the server's self-signed certificate (for /wt)
//   ?netPings=n&netPingInterval=ms&wtTimeout=ms   network-estimate and WebTransport
//                          options (networkPings, networkPingIntervalMs, webTransportTimeoutMs)
import { Parley } from "/sdk/parley.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const devMode = document.querySelector('meta[name="parley-dev-tokens"]')?.content === "true";
const TRANSPORT_LABEL = { websocket: "WebSocket", sse: "SSE", poll: "long-poll", webtransport: "WebTransport" };

/** @type {Parley | undefined} */
let client;
let me = "";
let active = ""; // the room on screen
// room -> { room, dmPeer, unread, counted, lastSeq, readSeq, messages: Map<seq, msg>, oldest, more }
// `counted`: the last seq the server's `unread` figure already covers (from `connected` and
// our own receipts), so that a message pushed after that figure is not counted twice.
const rooms = new Map();
const pending = new Map(); // clientMsgId -> { room, body }
const presence = new Map(); // user -> online
const typingUntil = new Map(); // room -> Map<user, until>
const receipts = new Map(); // room -> Map<user, seq> (other members' read markers)
const imageUrls = new Map(); // fileId -> signed URL
const TITLE = document.title;

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

function hexBytes(hex) {
  return new Uint8Array((hex.match(/[0-9a-f]{2}/gi) ?? []).map((b) => parseInt(b, 16)));
}

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
    webTransport: params.get("webTransport") || undefined,
    serverCertificateHashes: params.has("certHash") ? [{ algorithm: "sha-256", value: hexBytes(params.get("certHash")) }] : undefined,
    networkPings: ms("netPings"),
    networkPingIntervalMs: ms("netPingInterval"),
    webTransportTimeoutMs: ms("wtTimeout"),
  });
  window.parley = client; // for the console and the browser tests
  wire(client);
  $("login").hidden = true;
  $("app").hidden = false;
  showTransport();
  updateComposer();
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

/** A visible, announced message in place of alert(); hides itself after a while. */
let noticeTimer;
function notify(text) {
  const el = $("notice");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => (el.hidden = true), 8000);
}

const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

// ---------------------------------------------------------------- SDK events

function wire(c) {
  c.on("state", (ev) => {
    showTransport();
    showOutage(ev);
    updateComposer();
  });
  c.on("connected", (ev) => {
    window.connectedAt ??= performance.now(); // ms since navigation start (benchmarks)
    me = ev.userId;
    $("me-name").textContent = me;
    for (const r of ev.rooms) {
      const room = roomOf(r.room, r.dmPeer);
      room.private = r.private;
      room.unread = r.unread;
      room.counted = Math.max(room.counted, r.lastSeq);
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
    if (m.sender !== me && (m.room !== active || document.hidden)) {
      if (m.seq > room.counted) room.unread += 1;
      desktopNotify(m, room);
    }
    stopTyping(m.room, m.sender);
    if (m.room === active) {
      renderMessages();
      if (!document.hidden) markRead(m.room);
    }
    renderRooms();
  });
  c.on("receipt", (r) => {
    if (r.user !== me) {
      let users = receipts.get(r.room);
      if (!users) receipts.set(r.room, (users = new Map()));
      users.set(r.user, Math.max(users.get(r.user) ?? 0, r.seq));
      if (r.room === active) renderMessages();
      return;
    }
    const room = roomOf(r.room, peerOf(r.room));
    room.readSeq = Math.max(room.readSeq, r.seq);
    room.unread = r.unread;
    // The server counted the messages after r.seq when it took the marker; one of them may
    // not have reached this page yet (its push and this receipt travel apart). At least
    // r.seq + r.unread is covered: a seq never holds two messages.
    room.counted = Math.max(room.counted, r.seq + r.unread);
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
    renderMembers();
  });
  c.on("membership", (m) => {
    if (m.user === me && m.action !== "left") {
      const known = rooms.has(m.room);
      roomOf(m.room, peerOf(m.room));
      if (m.action === "invited" && m.by !== me && !known) {
        rooms.get(m.room).private = true; // only private rooms need an invitation to see
        notify(`${m.by} invited you to # ${m.room}.`);
      }
      renderRooms();
    }
    if (m.user === me && m.action === "left") {
      rooms.delete(m.room);
      if (active === m.room) open("lobby");
      renderRooms();
    }
    if (m.room === active) loadMembers(m.room);
  });
  c.on("announcement", (a) => {
    // To everyone: a banner over the page. To a room: a notice in that room only.
    if (!a.room) {
      $("announce-text").textContent = `📣 ${a.body}`;
      $("announce").hidden = false;
      return;
    }
    const room = roomOf(a.room, peerOf(a.room));
    room.notice = a.body;
    if (a.room === active) renderMessages();
  });
}

$("announce-close").addEventListener("click", () => ($("announce").hidden = true));

// Desktop notifications for messages that arrive while the page is hidden or another room
// is open, once the user turned them on (the browser asks for permission).
const canNotify = typeof Notification !== "undefined";
let notifyOn = canNotify && Notification.permission === "granted" && localStorage.getItem("parley.demo.notify") === "on";
window.notifications = []; // shown so far: [{ title, body, room }] (for the console and the tests)
function showNotifyButton() {
  $("notify-btn").hidden = !canNotify || notifyOn || Notification.permission === "denied";
}
showNotifyButton();
$("notify-btn").addEventListener("click", async () => {
  const p = await Notification.requestPermission();
  notifyOn = p === "granted";
  if (notifyOn) localStorage.setItem("parley.demo.notify", "on");
  else notify("Notifications are blocked for this site in the browser's settings.");
  showNotifyButton();
});
function desktopNotify(m, room) {
  if (!notifyOn || (!document.hidden && m.room === active)) return;
  const title = room.dmPeer ? m.sender : `${m.sender} in # ${m.room}`;
  const body = m.body || (m.attachments.length ? `sent ${m.attachments[0].name}` : "");
  try {
    const n = new Notification(title, { body, tag: m.room });
    n.onclick = () => {
      window.focus();
      open(m.room);
      n.close();
    };
    window.notifications.push({ title, body, room: m.room });
  } catch (e) {
    report(e); // e.g. Android Chrome wants a service worker for notifications
  }
}

/** The outage banner: what happened, when the next try is, and "retry now". */
let outageTimer;
function showOutage(ev) {
  clearInterval(outageTimer);
  const el = $("outage");
  const down = ev.state === "reconnecting" || ev.state === "paused" || (ev.state === "closed" && ev.error);
  el.hidden = !down;
  $("retry").hidden = ev.state === "closed";
  if (!down) return;
  if (ev.state === "closed") {
    $("outage-text").textContent = `Signed out: ${ev.error.message}`;
    return;
  }
  const until = Date.now() + ev.nextDelayMs;
  const tick = () => {
    const s = Math.max(0, Math.ceil((until - Date.now()) / 1000));
    $("outage-text").textContent =
      ev.state === "paused"
        ? "Connection lost; reconnecting when this tab is visible again."
        : `Connection lost. ${s > 0 ? `Reconnecting in ${s} s` : "Reconnecting…"} (attempt ${ev.attempt}). Messages you send are kept and go out once connected.`;
  };
  tick();
  outageTimer = setInterval(tick, 1000);
}
$("retry").addEventListener("click", () => client?.retryNow());

/** The composer works once a room is open; before the first connection it says so. */
function updateComposer() {
  const ready = !!active && !!client && client.state !== "closed";
  const first = !client || client.state === "idle" || client.state === "connecting";
  $("text").disabled = $("send-btn").disabled = $("attach").disabled = !ready;
  $("text").placeholder = !ready ? (first ? "Connecting…" : "Open a room to write") : "Write a message";
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
    state === "connected" ? `${TRANSPORT_LABEL[t] ?? t}${t === "websocket" || t === "webtransport" ? ` · ${params.get("encoding") === "json" ? "json" : "protobuf"}` : ""}` : state;
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
    r = { room: name, dmPeer: dmPeer || "", unread: 0, counted: 0, lastSeq: 0, readSeq: 0, messages: new Map(), oldest: 0, more: false, loaded: false };
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
    const row = document.createElement("button");
    row.type = "button";
    row.className = "row";
    if (r.room === active) row.setAttribute("aria-current", "page");
    if (r.dmPeer) {
      const dot = document.createElement("span");
      dot.className = "dot" + (presence.get(r.dmPeer) ? " online" : "");
      dot.title = presence.get(r.dmPeer) ? "online" : "offline";
      row.append(dot);
    }
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = r.dmPeer ? r.dmPeer : `# ${r.room}`;
    row.append(name);
    if (r.private && !r.dmPeer) {
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = "private";
      row.append(tag);
    }
    // For screen readers, as text (the accessible name then starts with what is shown).
    const hidden = (text) => {
      const span = document.createElement("span");
      span.className = "visually-hidden";
      span.textContent = text;
      return span;
    };
    if (r.dmPeer) row.append(hidden(presence.get(r.dmPeer) ? ", online" : ", offline"));
    if (r.unread > 0 && r.room !== active) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = String(r.unread);
      row.append(badge, hidden(" unread"));
    }
    row.addEventListener("click", () => open(r.room));
    li.append(row);
    (r.dmPeer ? groups.dms : groups.rooms).append(li);
  }
  // Unread elsewhere: on the ☰ button (phone, drawer closed) and in the tab title.
  const unread = [...rooms.values()].reduce((n, r) => n + (r.room === active && !document.hidden ? 0 : r.unread), 0);
  $("menu-badge").hidden = unread === 0;
  $("menu-badge").textContent = String(unread);
  $("menu").setAttribute("aria-label", unread ? `rooms, ${plural(unread, "unread message", "unread messages")}` : "rooms");
  document.title = unread ? `(${unread}) ${TITLE}` : TITLE;
}

async function open(name) {
  active = name;
  closeDrawer();
  const r = roomOf(name, peerOf(name));
  $("room-title").textContent = r.dmPeer ? `@ ${r.dmPeer}` : `# ${name}`;
  $("leave-btn").hidden = !!r.dmPeer || name === "lobby";
  $("invite-btn").hidden = !!r.dmPeer;
  setInvite(false);
  $("people-btn").hidden = !!r.dmPeer;
  if (r.dmPeer) setPeople(false);
  updateComposer();
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
  renderMembers();
}

function renderMembers() {
  const r = rooms.get(active);
  const list = $("members");
  list.replaceChildren();
  if (!r?.members) return;
  const sorted = [...r.members].sort((a, b) => Number(!!presence.get(b) || b === me) - Number(!!presence.get(a) || a === me) || a.localeCompare(b));
  for (const u of sorted) {
    const li = document.createElement("li");
    const online = u === me || !!presence.get(u);
    const dot = document.createElement("span");
    dot.className = "dot" + (online ? " online" : "");
    const name = document.createElement("span");
    name.textContent = u === me ? `${u} (you)` : u;
    li.append(dot, name);
    li.setAttribute("aria-label", `${u}, ${online ? "online" : "offline"}`);
    li.dataset.user = u;
    list.append(li);
  }
}

function setPeople(open) {
  if (open && !$("browse").hidden) setBrowse(false);
  $("people").hidden = !open;
  $("people-btn").setAttribute("aria-expanded", String(open));
  if (open) renderMembers();
}
$("people-btn").addEventListener("click", () => setPeople($("people").hidden));

function setInvite(open) {
  $("invite-form").hidden = !open;
  $("invite-btn").setAttribute("aria-expanded", String(open));
  if (open) $("invite-input").focus();
}
$("invite-btn").addEventListener("click", () => setInvite($("invite-form").hidden));
$("invite-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const user = $("invite-input").value.trim();
  const room = active;
  if (!user || !room) return;
  try {
    await client.invite(room, user);
    $("invite-input").value = "";
    setInvite(false);
    notify(`${user} is now a member of # ${room}.`);
  } catch (err) {
    notify(`Could not invite ${user}: ${err.message}`);
  }
});

$("create-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const name = $("create-input").value.trim();
  if (!name) return;
  try {
    await client.createRoom(name, { private: true });
    $("create-input").value = "";
    roomOf(name, "").private = true;
    open(name);
  } catch (err) {
    notify(`Could not create # ${name}: ${err.message}`);
  }
});

$("leave-btn").addEventListener("click", async () => {
  const name = active;
  if (!name || rooms.get(name)?.dmPeer) return;
  try {
    await client.leave(name);
    rooms.delete(name);
    renderRooms();
    open("lobby");
    notify(`You left # ${name}.`);
  } catch (err) {
    notify(`Could not leave # ${name}: ${err.message}`);
  }
});

function renderSub() {
  const r = rooms.get(active);
  const sub = $("room-sub");
  if (!r) return (sub.textContent = "");
  if (r.dmPeer) sub.textContent = presence.get(r.dmPeer) ? "online" : "offline";
  else if (r.members) {
    const online = r.members.filter((u) => u === me || presence.get(u)).length;
    sub.textContent = `${plural(r.members.length, "member", "members")}, ${online} online`;
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
    notify(`Could not join # ${name}: ${err.message}`);
  }
});

// ---------------------------------------------------------------- room browser

/** Text for screen readers only (an accessible name that starts with what is shown). */
function srOnly(text) {
  const span = document.createElement("span");
  span.className = "visually-hidden";
  span.textContent = text;
  return span;
}

let browseAfter = ""; // the last public room listed: the next page starts after it
const BROWSE_PAGE = Number(params.get("browsePage")) || 25;

function setBrowse(open) {
  $("browse").hidden = !open;
  $("browse-btn").setAttribute("aria-expanded", String(open));
  if (!open) return;
  closeDrawer();
  setPeople(false);
  $("public-rooms").replaceChildren();
  browseAfter = "";
  $("browse-title").focus();
  loadPublicRooms();
}

/** The next page of public rooms, appended; focus moves to the first new one after "More". */
async function loadPublicRooms(focusNew = false) {
  try {
    const page = await client.publicRooms({ after: browseAfter, limit: BROWSE_PAGE });
    const items = page.rooms.map(publicRoomItem);
    $("public-rooms").append(...items);
    if (page.rooms.length) browseAfter = page.rooms[page.rooms.length - 1].room;
    $("browse-more").hidden = !page.more;
    $("browse-empty").hidden = $("public-rooms").children.length > 0;
    if (focusNew) (items[0]?.querySelector("button") ?? $("browse-title")).focus();
  } catch (e) {
    notify(`Could not list the public rooms: ${e.message}`);
  }
}

function publicRoomItem(r) {
  const li = document.createElement("li");
  li.dataset.room = r.room;
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = `# ${r.room}`;
  const count = document.createElement("span");
  count.className = "muted";
  count.textContent = plural(r.members, "member", "members");
  const member = rooms.has(r.room);
  const btn = document.createElement("button");
  btn.type = "button";
  btn.className = "ghost";
  btn.textContent = member ? "Open" : "Join";
  btn.append(srOnly(` # ${r.room}`));
  btn.addEventListener("click", async () => {
    try {
      if (!member) await client.join(r.room);
      roomOf(r.room, "");
      setBrowse(false);
      open(r.room);
    } catch (err) {
      notify(`Could not join # ${r.room}: ${err.message}`);
    }
  });
  li.append(name, count, btn);
  return li;
}

function closeBrowse() {
  setBrowse(false);
  // Back to the button that opened it; on a phone it is in the closed drawer: ☰ then.
  $("browse-btn").focus();
  if (document.activeElement !== $("browse-btn")) $("menu").focus();
}

$("browse-btn").addEventListener("click", () => ($("browse").hidden ? setBrowse(true) : closeBrowse()));
$("browse-close").addEventListener("click", closeBrowse);
$("browse-more").addEventListener("click", () => loadPublicRooms(true));

$("dm-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const user = $("dm-input").value.trim();
  if (!user || user === me) return;
  $("dm-input").value = "";
  roomOf(dmRoom(user), user);
  open(dmRoom(user));
});

// The phone drawer: ☰ opens it over the chat; the backdrop, Escape or picking a room closes it.
function openDrawer() {
  $("sidebar").classList.add("open");
  $("backdrop").hidden = false;
  $("menu").setAttribute("aria-expanded", "true");
  $("sidebar").querySelector("button.row, input")?.focus();
}
function closeDrawer() {
  if (!$("sidebar").classList.contains("open")) return;
  $("sidebar").classList.remove("open");
  $("backdrop").hidden = true;
  $("menu").setAttribute("aria-expanded", "false");
}
$("menu").addEventListener("click", () => ($("sidebar").classList.contains("open") ? closeDrawer() : openDrawer()));
$("backdrop").addEventListener("click", closeDrawer);
$("drawer-close").addEventListener("click", () => {
  closeDrawer();
  $("menu").focus();
});
document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape") return;
  if ($("sidebar").classList.contains("open")) {
    closeDrawer();
    $("menu").focus();
  } else if (!$("browse").hidden) closeBrowse();
  else if (!$("people").hidden) setPeople(false);
});

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
  let day = "";
  let prev;
  // Read receipts: under my newest message that others have read, who read it.
  const readers = [...(receipts.get(active) ?? new Map()).entries()];
  const mine = seqs.filter((q) => r.messages.get(q).sender === me);
  let seenAt = 0;
  for (let i = mine.length - 1; i >= 0 && !seenAt; i--) if (readers.some(([, q]) => q >= mine[i])) seenAt = mine[i];
  for (const seq of seqs) {
    const m = r.messages.get(seq);
    const d = new Date(m.ts).toDateString();
    if (d !== day) {
      day = d;
      const sep = document.createElement("li");
      sep.className = "day";
      sep.textContent = new Date(m.ts).toLocaleDateString([], { weekday: "long", month: "long", day: "numeric" });
      list.append(sep);
      prev = undefined;
    }
    const item = messageItem(m, false, prev && prev.sender === m.sender && m.ts - prev.ts < 5 * 60_000);
    if (seq === seenAt) {
      const seen = document.createElement("div");
      seen.className = "seen";
      seen.textContent = `Seen by ${readers.filter(([, q]) => q >= seq).map(([u]) => u).sort().join(", ")}`;
      item.append(seen);
    }
    list.append(item);
    prev = m;
  }
  for (const [id, p] of pending) {
    if (p.room === active) list.append(messageItem({ sender: me, body: p.body, clientMsgId: id, ts: p.ts, seq: 0, attachments: [] }, true));
  }
  $("empty").hidden = seqs.length > 0 || [...pending.values()].some((p) => p.room === active);
  $("empty").textContent = r.dmPeer ? `No messages with ${r.dmPeer} yet. Say hello!` : `No messages in # ${r.room} yet.`;
  if (r.notice) {
    const li = document.createElement("li");
    li.className = "msg notice";
    li.textContent = `📣 ${r.notice}`;
    list.append(li);
  }
  if (atEnd) box.scrollTop = box.scrollHeight;
}

function messageItem(m, isPending, grouped) {
  const li = document.createElement("li");
  li.className = "msg" + (m.sender === me ? " mine" : "") + (isPending ? " pending" : "") + (grouped ? " grouped" : "");
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
  for (const a of m.attachments ?? []) li.append(attachmentItem(a));
  return li;
}

/** An image: its box sized from width/height, a placeholder colour, then the picture (signed URL). */
function attachmentItem(a) {
  const box = document.createElement("div");
  box.className = "attachment";
  box.dataset.fileId = a.fileId;
  if (a.contentType.startsWith("image/") && a.width && a.height) {
    const img = document.createElement("img");
    img.alt = a.name;
    img.width = Math.min(240, a.width);
    img.height = Math.round((img.width * a.height) / a.width);
    if (a.blurhash) {
      const placeholder = blurhashImage(a.blurhash, img.width, img.height);
      if (placeholder) img.style.backgroundImage = `url("${placeholder}")`;
    }
    const url = imageUrls.get(a.fileId);
    if (url) img.src = url;
    else
      client.fileUrl(a.fileId).then((u) => {
        imageUrls.set(a.fileId, u);
        img.src = u;
      }, report);
    box.append(img);
  }
  const link = document.createElement("span");
  link.className = "file muted";
  link.textContent = `${a.name} · ${formatSize(a.size)}`;
  box.append(link);
  return box;
}

/**
 * A BlurHash (https://blurha.sh) painted small, as a data: URL to show while the picture
 * loads: the hash holds a grid of colour components (cosine basis) in base 83.
 */
function blurhashImage(hash, width, height) {
  const digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#$%*+,-.:;=?@[]^_{|}~";
  const b83 = (str) => [...str].reduce((v, c) => v * 83 + digits.indexOf(c), 0);
  const toLinear = (v) => ((v /= 255) <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
  const toSrgb = (v) => {
    v = Math.min(1, Math.max(0, v));
    return Math.round((v <= 0.0031308 ? v * 12.92 : 1.055 * v ** (1 / 2.4) - 0.055) * 255);
  };
  const size = b83(hash[0] ?? "");
  const nx = (size % 9) + 1;
  const ny = Math.floor(size / 9) + 1;
  if (hash.length !== 4 + 2 * nx * ny) return "";
  const max = (b83(hash[1]) + 1) / 166;
  const dc = b83(hash.slice(2, 6));
  const colors = [[toLinear(dc >> 16), toLinear((dc >> 8) & 255), toLinear(dc & 255)]];
  const signPow = (v) => Math.sign(v) * Math.abs(v) ** 2;
  for (let i = 1; i < nx * ny; i++) {
    const v = b83(hash.slice(4 + i * 2, 6 + i * 2));
    colors.push([Math.floor(v / 361), Math.floor(v / 19) % 19, v % 19].map((q) => signPow((q - 9) / 9) * max));
  }
  const w = 32;
  const h = Math.max(1, Math.round((32 * height) / width));
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const g = canvas.getContext("2d");
  if (!g) return "";
  const out = g.createImageData(w, h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const px = [0, 0, 0];
      for (let j = 0; j < ny; j++) {
        for (let i = 0; i < nx; i++) {
          const basis = Math.cos((Math.PI * x * i) / w) * Math.cos((Math.PI * y * j) / h);
          const c = colors[i + j * nx];
          for (let k = 0; k < 3; k++) px[k] += c[k] * basis;
        }
      }
      out.data.set([...px.map(toSrgb), 255], 4 * (y * w + x));
    }
  }
  g.putImageData(out, 0, 0);
  return canvas.toDataURL();
}

function formatSize(n) {
  return n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / (1 << 20)).toFixed(1)} MiB`;
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
  lastTyping = 0; // the next keystroke tells the others again
  const r = rooms.get(active);
  const clientMsgId = crypto.randomUUID();
  pending.set(clientMsgId, { room: active, body, ts: Date.now() });
  renderMessages(true);
  const sent = r.dmPeer ? client.sendDirect(r.dmPeer, body, { clientMsgId }) : client.send(active, body, { clientMsgId });
  Promise.resolve(sent).catch((err) => {
    pending.delete(clientMsgId);
    renderMessages();
    notify(`Not sent: ${err.message}`);
  });
});

// Attachments: pick (Attach) or drop a file; upload with progress, then send it.
$("attach").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", () => {
  const f = $("file").files[0];
  $("file").value = "";
  if (f) sendFile(f);
});
$("messages").addEventListener("dragover", (e) => {
  if (active) e.preventDefault();
});
$("messages").addEventListener("drop", (e) => {
  e.preventDefault();
  const f = e.dataTransfer?.files?.[0];
  if (f && active) sendFile(f);
});

async function sendFile(file) {
  const room = active;
  const r = rooms.get(room);
  $("upload").hidden = false;
  $("upload-name").textContent = `Uploading ${file.name}…`;
  $("upload-progress").value = 0;
  try {
    const a = await client.upload(file, { onProgress: (sent, total) => ($("upload-progress").value = total ? sent / total : 0) });
    const body = $("text").value.trim();
    $("text").value = "";
    if (r?.dmPeer) await client.sendDirect(r.dmPeer, body, { attachments: [a] });
    else await client.send(room, body, { attachments: [a] });
  } catch (err) {
    notify(`Could not send ${file.name}: ${err.message}`);
  } finally {
    $("upload").hidden = true;
  }
}

// "typing" goes out on the first keystroke and then at most every 2.5 s while typing; a
// send starts over, so a message typed right after a send is announced too — deferred
// past the server's limit (chat.typing_interval, 1 s per room) when the last one was
// just sent, rather than refused. The limit runs on the server's clock from when it took
// the last one, which is before its reply came back here: counting 1.1 s from that reply
// (not from the send, which a slow link can delay by more than the margin) keeps the next
// one past the limit however long the last one took to arrive.
let lastTyping = 0;
let lastTypingDone = 0; // when the server's reply to the last "typing" came back
let typingInFlight = null;
let typingTimer;
let typingGen = 0; // a keystroke after a send starts over: an older wait gives up
$("text").addEventListener("input", () => {
  const r = rooms.get(active);
  if (!r || !client || Date.now() - lastTyping < 2500 || !$("text").value) return;
  if (r.dmPeer && r.messages.size === 0) return; // the DM room exists after the first message
  lastTyping = Date.now();
  const room = active;
  clearTimeout(typingTimer);
  const gen = ++typingGen;
  const fire = async () => {
    if (typingInFlight) await typingInFlight;
    if (gen !== typingGen) return;
    const wait = lastTypingDone + 1100 - Date.now();
    if (wait > 0) {
      typingTimer = setTimeout(fire, wait);
      return;
    }
    if (!$("text").value || active !== room || !client) return;
    typingInFlight = client.typing(room).finally(() => {
      lastTypingDone = Date.now();
      typingInFlight = null;
    });
  };
  typingTimer = setTimeout(fire, 0);
});

function stopTyping(room, user) {
  typingUntil.get(room)?.delete(user);
  renderTyping();
}

function renderTyping() {
  const users = [...(typingUntil.get(active) ?? new Map()).entries()].filter(([, until]) => until > Date.now()).map(([u]) => u);
  $("typing").textContent = users.length === 0 ? "" : users.length === 1 ? `${users[0]} is typing…` : `${users.join(", ")} are typing…`;
}
