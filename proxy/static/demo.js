// The demo page: sign in as a guest, then stream the tutor's answer into the page as it arrives.
// Every state-changing call sends X-CSRF: 1 and the session cookie (same origin).
//
// On load the page asks GET /demo/session (a demo-only route that answers 200 with or without a
// session, so a first visit logs no 401) and signs in as a guest only when there is no session: a
// reload keeps its guest, and with it the answer it may resume.
//
// Relay mode asks through the chat route (POST /api/chat/tutor?protocol=text) with this tab's chat
// id. The answer is a run on the server that outlives the request, so after a reload the page asks
// GET /api/chat/tutor/{chatId}/stream?protocol=text for it again: the answer from its first
// character, then live. The chat id and the question live in sessionStorage (this tab only).
// Because a dropped connection no longer ends the answer, Stop also calls the chat's stop route.
//
// Token mode mints a single-use token (POST /api/token) and streams straight from the upstream URL
// it names: nothing runs on our side, so there is nothing to resume or stop server-side.
//
// When the demo is configured for OpenID Connect, /demo/session says where to sign in (`sign_in`):
// the header then offers "Sign in", a plain link to /auth/login?returnTo=/ (the BFF sends the browser
// to the identity provider and back). A signed-in user is shown by name, with "Sign out": POST
// /auth/logout, then the provider's logout page when the answer names one. A failed sign-in comes
// back as /?auth_error=<code>, shown above the conversation.
const WORKFLOW = "tutor";
const SAVED = "workflow-bff-demo"; // sessionStorage: {chatId, question}
const SAVED_MODE = "workflow-bff-demo-mode";
const MODES = {
  relay: {
    label: "relay mode",
    hint: "Relay: workflow-bff streams the answer; no upstream key in the browser, and a reload resumes it.",
  },
  token: {
    label: "token mode",
    hint: "Token: workflow-bff mints a single-use token; the browser streams straight from the upstream.",
  },
};
// What /?auth_error=<code> means (proxy/routes/oidc.py), in words.
const AUTH_ERRORS = {
  access_denied: "the sign-in was cancelled at the identity provider.",
  login_expired: "it took too long, or was finished in another tab or browser. Try again.",
  login_failed: "the identity provider's answer could not be accepted. Try again.",
  idp_unavailable: "the identity provider could not be reached. Try again shortly.",
  login_required: "the identity provider asks you to sign in there first. Try again.",
  consent_required: "the identity provider needs your consent. Try again and allow access.",
  interaction_required: "the identity provider needs you to finish a step on its page. Try again.",
  temporarily_unavailable: "the identity provider is busy right now. Try again shortly.",
};
const $ = (id) => document.getElementById(id);
let controller = null; // aborts the fetch being read
let streamingChat = null; // the chat id of the relay answer being read, for Stop
let signedIn = false;

function randomId() {
  // crypto.randomUUID needs a secure context; a demo served on a LAN address over http is not one.
  return Array.from(crypto.getRandomValues(new Uint8Array(12)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function saved() {
  try {
    return JSON.parse(sessionStorage.getItem(SAVED)) ?? {};
  } catch {
    return {};
  }
}

function save(state) {
  sessionStorage.setItem(SAVED, JSON.stringify(state));
}

async function failure(response) {
  // JSON routes answer {"error": {"message"}}; the chat route answers short plain text.
  const text = await response.text();
  try {
    return new Error(JSON.parse(text).error.message);
  } catch {
    return new Error(text || `HTTP ${response.status}`);
  }
}

async function call(path, body, signal) {
  const response = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF": "1" },
    body: JSON.stringify(body ?? {}),
    signal,
  });
  if (!response.ok) throw await failure(response);
  return response;
}

// ---- what the page shows ----------------------------------------------------------------------

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
  $("app").dataset.state = state;
}

function currentMode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function showMode() {
  const mode = currentMode();
  $("mode-hint").textContent = MODES[mode].hint;
  sessionStorage.setItem(SAVED_MODE, mode);
}

function offerModes(modes) {
  for (const input of document.querySelectorAll('input[name="mode"]')) {
    input.disabled = Array.isArray(modes) && !modes.includes(input.value);
  }
  const remembered = document.querySelector(`input[name="mode"][value="${sessionStorage.getItem(SAVED_MODE)}"]`);
  if (remembered && !remembered.disabled) remembered.checked = true;
  const checked = document.querySelector('input[name="mode"]:checked');
  if (checked.disabled) document.querySelector('input[name="mode"]:not(:disabled)')?.click();
  showMode();
}

function setBusy(busy) {
  // Stop takes Send's place while the tutor answers; focus on one moves to the other (or, once the
  // answer is done and Send waits for a new question, to the question box) instead of being lost.
  const focused = [$("send"), $("stop")].includes(document.activeElement);
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("log").setAttribute("aria-busy", String(busy)); // read the answer out once, not word by word
  refreshSend();
  if (focused) (busy ? $("stop") : $("prompt")).focus();
}

function refreshSend() {
  $("send").disabled = !signedIn || controller !== null || !$("prompt").value.trim();
}

function isNearBottom() {
  const chat = $("chat");
  return chat.scrollHeight - chat.scrollTop - chat.clientHeight < 80;
}

function follow(pinned) {
  if (pinned) $("chat").scrollTop = $("chat").scrollHeight;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function addMessage(kind, text, mode, note) {
  const pinned = kind === "user" || isNearBottom(); // a question just asked is always scrolled to
  $("intro").hidden = true;
  const item = element("li", `msg ${kind}`);
  const meta = element("p", "meta");
  if (kind === "user") {
    meta.append(element("span", "visually-hidden", "You asked:"));
  } else {
    meta.append(element("span", "avatar"), element("span", "name", "Tutor"));
    const badge = element("span", `badge ${mode}`, MODES[mode].label);
    badge.title = MODES[mode].hint;
    meta.append(badge);
    if (note) meta.append(element("span", "badge plain", note));
  }
  const body = element("div", "text", text);
  item.append(meta, body);
  $("log").append(item);
  follow(pinned);
  return item;
}

function showError(item, message) {
  const pinned = isNearBottom();
  const box = element("p", "error");
  box.setAttribute("role", "alert");
  box.append(element("strong", "", "No answer: "), document.createTextNode(message));
  item.classList.add("failed");
  item.append(box);
  follow(pinned);
}

// ---- streaming -------------------------------------------------------------------------------------

async function openStream(mode, text, signal) {
  if (mode === "relay") {
    const chatId = saved().chatId ?? randomId();
    save({ chatId, question: text });
    streamingChat = chatId;
    const message = { id: randomId(), role: "user", parts: [{ type: "text", text }] };
    return call(`/api/chat/${WORKFLOW}?protocol=text`, { id: chatId, messages: [message] }, signal);
  }
  // Token-mediating mode: mint a single-use token, then stream straight from the upstream. No run on
  // our side, so nothing to resume after a reload: forget the relay question.
  save({ chatId: saved().chatId });
  const minted = await (await call("/api/token", { workflow: WORKFLOW }, signal)).json();
  const response = await fetch(minted.stream_url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ message: text }),
    signal,
  });
  if (!response.ok) throw new Error(`the upstream answered HTTP ${response.status}`);
  return response;
}

// Shows the question, then reads the answer that `open(signal)` resolves to into the page.
async function converse(question, mode, open, { abort = new AbortController(), note } = {}) {
  addMessage("user", question, mode);
  const item = addMessage("assistant", "", mode, note);
  const answer = item.querySelector(".text");
  item.classList.add("streaming", "waiting");
  controller = abort;
  setBusy(true);
  setStatus("streaming", `The tutor is answering in ${MODES[mode].label}…`);
  try {
    const response = await open(controller.signal);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const pinned = isNearBottom();
      item.classList.remove("waiting");
      answer.textContent += value;
      follow(pinned);
    }
    setStatus("done", `Answered in ${MODES[mode].label}.`);
  } catch (error) {
    if (error.name === "AbortError") {
      item.classList.add("stopped");
      item.querySelector(".meta").append(element("span", "badge plain", "stopped"));
      setStatus("stopped", "Stopped. Ask another question when you like.");
    } else {
      showError(item, error.message);
      setStatus("error", "The tutor could not answer.");
    }
  } finally {
    item.classList.remove("streaming", "waiting");
    controller = null;
    streamingChat = null;
    setBusy(false);
  }
}

function ask(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller || !signedIn) return;
  $("prompt").value = "";
  const mode = currentMode();
  converse(text, mode, (signal) => openStream(mode, text, signal));
}

function stop() {
  controller?.abort();
  if (streamingChat) {
    const path = `/api/chat/${WORKFLOW}/${encodeURIComponent(streamingChat)}/stop`;
    call(path).catch((error) => setStatus("error", `Stop failed: ${error.message}`));
  }
}

// After a reload: the last relay answer of this tab, if the server still has it (204 otherwise).
async function resume() {
  const { chatId, question } = saved();
  if (!chatId || !question) return;
  const abort = (controller = new AbortController());
  const path = `/api/chat/${WORKFLOW}/${encodeURIComponent(chatId)}/stream?protocol=text`;
  let response;
  try {
    response = await fetch(path, { credentials: "same-origin", signal: abort.signal });
  } finally {
    controller = null;
  }
  if (response.status !== 200) {
    save({ chatId }); // 204: nothing (any more) to resume
    return;
  }
  streamingChat = chatId;
  await converse(question, "relay", async () => response, { abort, note: "resumed after reload" });
}

async function signIn() {
  const response = await fetch("/demo/session", { credentials: "same-origin" });
  if (!response.ok) throw await failure(response);
  let body = await response.json();
  offerModes(body.modes);
  const signInOffered = typeof body.sign_in === "string" && body.sign_in.startsWith("/");
  if (signInOffered) $("sign-in").href = `${body.sign_in}?${new URLSearchParams({ returnTo: "/" })}`;
  if (!body.user) body = await (await call("/auth/guest")).json();
  signedIn = true;
  showUser(body.user, signInOffered);
  setStatus("idle", "Ready.");
  refreshSend();
}

function showUser(user, signInOffered) {
  const guest = user.kind === "guest";
  const name = guest ? `Guest ${user.id.replace(/^guest_/, "").slice(0, 6)}` : (user.name ?? user.id);
  $("who-text").textContent = name;
  $("who").title = guest ? `Signed in as ${user.kind} ${user.id}` : `Signed in as ${name} (${user.id})`;
  $("app").dataset.session = user.kind;
  $("intro-who").textContent = guest ? "You are signed in as a guest." : `You are signed in as ${name}.`;
  $("sign-in").hidden = !(guest && signInOffered);
  $("sign-out").hidden = guest;
}

async function signOut() {
  $("sign-out").disabled = true;
  controller?.abort();
  try {
    const response = await call("/auth/logout");
    save({}); // the chat belonged to the session that just ended
    // 200 {"logout_url"}: end the session at the provider too, which then sends the browser back here.
    const logoutUrl = response.status === 200 ? (await response.json()).logout_url : null;
    const target = logoutUrl ? new URL(logoutUrl) : null;
    location.assign(target && ["https:", "http:"].includes(target.protocol) ? target.href : "/");
  } catch (error) {
    $("sign-out").disabled = false;
    setStatus("error", `Sign-out failed: ${error.message}`);
  }
}

// After a failed sign-in the BFF sends the browser to /?auth_error=<code>: say what happened, once
// (the code leaves the address bar, so a reload does not repeat it).
function showAuthError() {
  const params = new URLSearchParams(location.search);
  const code = params.get("auth_error");
  if (code === null) return;
  params.delete("auth_error");
  const query = params.toString();
  history.replaceState(history.state, "", `${location.pathname}${query ? `?${query}` : ""}${location.hash}`);
  const known = Object.hasOwn(AUTH_ERRORS, code);
  const shown = /^[a-z_]{1,40}$/.test(code) ? ` (${code})` : "";
  const box = $("auth-error");
  box.replaceChildren(
    element("strong", "", "Sign-in failed: "),
    document.createTextNode(known ? AUTH_ERRORS[code] : `the sign-in did not complete${shown}. Try again.`),
  );
  box.hidden = false;
}

// ---- wiring ----------------------------------------------------------------------------------------

$("ask").addEventListener("submit", ask);
$("sign-out").addEventListener("click", signOut);
$("stop").addEventListener("click", stop);
$("prompt").addEventListener("input", refreshSend);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && controller) stop();
});
for (const input of document.querySelectorAll('input[name="mode"]')) input.addEventListener("change", showMode);
for (const button of document.querySelectorAll(".suggestion")) {
  button.addEventListener("click", () => {
    $("prompt").value = button.textContent;
    refreshSend();
    $("ask").requestSubmit();
    $("prompt").focus();
  });
}
showMode();
showAuthError();
setStatus("idle", "Connecting…");
signIn().then(
  () => resume().catch((error) => setStatus("error", `Could not resume the last answer: ${error.message}`)),
  (error) => {
    $("app").dataset.session = "failed";
    $("who-text").textContent = "Not signed in";
    const item = element("li", "msg assistant failed");
    $("log").append(item);
    showError(item, `Signing in as a guest failed: ${error.message}. Reload the page to try again.`);
    setStatus("error", "Sign-in failed.");
  },
);
