// Talking to workflow-bff from the same origin: the session cookie goes along by itself
// (credentials "same-origin"), and every state-changing call carries the X-CSRF: 1 header.
import { generateId } from "ai";

export const WORKFLOW = import.meta.env.VITE_WORKFLOW ?? "tutor";
export const CSRF_HEADERS = { "X-CSRF": "1" };

export async function postJson(path, body) {
  const response = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", ...CSRF_HEADERS },
    body: JSON.stringify(body ?? {}),
  });
  if (!response.ok) {
    const text = await response.text();
    let message = text || `HTTP ${response.status}`;
    try {
      message = JSON.parse(text).error.message; // JSON routes answer {"error": {"code", "message"}}
    } catch {
      // not JSON: keep the text
    }
    throw new Error(message);
  }
  return response.json();
}

export async function currentUser() {
  const response = await fetch("/auth/session", { credentials: "same-origin" });
  return response.ok ? (await response.json()).user : null;
}

export async function signInAsGuest() {
  return (await postJson("/auth/guest")).user;
}

// A chat's id and messages, kept for this tab across reloads (sessionStorage). The id binds the
// relay's run to the chat, so after a reload useChat({ id, resume: true }) finds the answer again;
// the messages redraw the conversation (workflow-bff stores no chats).
export function savedChat(key) {
  let id = sessionStorage.getItem(`${key}:id`);
  if (!id) {
    id = generateId();
    sessionStorage.setItem(`${key}:id`, id);
  }
  let messages = [];
  try {
    messages = JSON.parse(sessionStorage.getItem(`${key}:messages`)) ?? [];
  } catch {
    // nothing usable saved
  }
  return { id, messages };
}

export function saveMessages(key, messages) {
  sessionStorage.setItem(`${key}:messages`, JSON.stringify(messages));
}

// Ends the chat's run on the server. A run outlives its connection (so a reload can resume it), so
// useChat's stop(), which only aborts the fetch, no longer stops the generation by itself.
export async function stopChat(chatId) {
  const response = await fetch(`/api/chat/${WORKFLOW}/${encodeURIComponent(chatId)}/stop`, {
    method: "POST",
    credentials: "same-origin",
    headers: CSRF_HEADERS,
  });
  if (!response.ok) throw new Error(`Stop failed: HTTP ${response.status}`);
}
