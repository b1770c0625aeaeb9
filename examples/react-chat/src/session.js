// Talking to workflow-bff from the same origin: the session cookie goes along by itself
// (credentials "same-origin"), and every state-changing call carries the X-CSRF: 1 header.
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
