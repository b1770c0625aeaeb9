// The demo page: sign in as a guest, then stream the tutor's answer into the page as it arrives.
// Every state-changing call sends X-CSRF: 1 and the session cookie (same origin).
const WORKFLOW = "tutor";
const $ = (id) => document.getElementById(id);
let controller = null;

async function call(path, body) {
  const response = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF": "1" },
    body: JSON.stringify(body ?? {}),
    signal: controller?.signal,
  });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error.message; } catch { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function signIn() {
  const session = await fetch("/auth/session", { credentials: "same-origin" });
  const body = session.ok ? await session.json() : await (await call("/auth/guest")).json();
  $("who").textContent = `${body.user.kind} ${body.user.id}`;
}

async function openStream(mode, text) {
  if (mode === "relay") {
    return call(`/api/workflows/${WORKFLOW}/stream`, { message: text });
  }
  // Token-mediating mode: mint a single-use token, then stream straight from the upstream.
  const minted = await (await call("/api/token", { workflow: WORKFLOW })).json();
  const response = await fetch(minted.stream_url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ message: text }),
    signal: controller.signal,
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

async function ask(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = "";
  bubble("user", text);
  const answer = bubble("assistant", "");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "streaming";
  try {
    const response = await openStream($("mode").value, text);
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
  }
}

$("ask").addEventListener("submit", ask);
$("stop").addEventListener("click", () => controller?.abort());
signIn().catch((error) => { $("who").textContent = `sign-in failed: ${error.message}`; });
