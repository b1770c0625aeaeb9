// The demo page: sign in as a guest, then stream the tutor's answer into the page as it arrives.
// Every state-changing call sends X-CSRF: 1 and the session cookie (same origin).
//
// Relay mode asks through the chat route (POST /api/chat/tutor?protocol=text) with this tab's chat
// id. The answer is a run on the server that outlives the request, so after a reload the page asks
// GET /api/chat/tutor/{chatId}/stream?protocol=text for it again: the answer from its first
// character, then live. The chat id and the question live in sessionStorage (this tab only).
// Because a dropped connection no longer ends the answer, Stop also calls the chat's stop route.
const WORKFLOW = "tutor";
const SAVED = "workflow-bff-demo"; // sessionStorage: {chatId, question}
const $ = (id) => document.getElementById(id);
let controller = null; // aborts the fetch being read
let streamingChat = null; // the chat id of the relay answer being read, for Stop

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

async function signIn() {
  const session = await fetch("/auth/session", { credentials: "same-origin" });
  const body = session.ok ? await session.json() : await (await call("/auth/guest")).json();
  $("who").textContent = `${body.user.kind} ${body.user.id}`;
}

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
  if (!response.ok) throw new Error(`upstream HTTP ${response.status}`);
  return response;
}

function bubble(kind, text) {
  const element = document.createElement("div");
  element.className = `msg ${kind}`;
  element.textContent = text;
  $("log").append(element);
  return element;
}

// Shows the question, then reads the answer that `open(signal)` resolves to into the page.
async function converse(question, open, abort = new AbortController()) {
  bubble("user", question);
  const answer = bubble("assistant", "");
  controller = abort;
  $("send").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "streaming";
  try {
    const response = await open(controller.signal);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      answer.textContent += value;
    }
    $("status").textContent = "done";
  } catch (error) {
    const stopped = error.name === "AbortError";
    if (!stopped) answer.classList.add("error");
    answer.textContent += stopped ? " [stopped]" : `\n${error.message}`;
    $("status").textContent = stopped ? "stopped" : "error";
  } finally {
    $("send").disabled = false;
    $("stop").disabled = true;
    controller = null;
    streamingChat = null;
  }
}

function ask(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  const mode = $("mode").value;
  converse(text, (signal) => openStream(mode, text, signal));
}

function stop() {
  controller?.abort();
  if (streamingChat) {
    const path = `/api/chat/${WORKFLOW}/${encodeURIComponent(streamingChat)}/stop`;
    call(path).catch((error) => { $("status").textContent = `stop failed: ${error.message}`; });
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
  await converse(question, async () => response, abort);
}

$("ask").addEventListener("submit", ask);
$("stop").addEventListener("click", stop);
signIn().then(
  () => resume().catch((error) => { $("status").textContent = `resume failed: ${error.message}`; }),
  (error) => { $("who").textContent = `sign-in failed: ${error.message}`; },
);
