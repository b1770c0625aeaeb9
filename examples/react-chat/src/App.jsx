import { DefaultChatTransport, TextStreamChatTransport } from "ai";
import { useEffect, useState } from "react";
import { ChatPanel } from "./ChatPanel.jsx";
import { CSRF_HEADERS, WORKFLOW, currentUser, signInAsGuest } from "./session.js";
import { TokenModeStream } from "./TokenModeStream.jsx";

// Created once, outside the component: a transport built on every render would drop its state.
// Same origin, so "same-origin" credentials carry the session cookie; a cross-origin app would use
// "include" and list its origin in BFF_ALLOWED_ORIGINS.
const uiTransport = new DefaultChatTransport({
  api: `/api/chat/${WORKFLOW}`, // the AI SDK UI message stream (?protocol=ui is the default)
  credentials: "same-origin",
  headers: CSRF_HEADERS,
});
const textTransport = new TextStreamChatTransport({
  api: `/api/chat/${WORKFLOW}?protocol=text`, // plain text: no in-band errors, a failure drops the stream
  credentials: "same-origin",
  headers: CSRF_HEADERS,
});

const DEMOS = {
  // resume: only with the UI message stream, whose replay carries the answer's message id (a text
  // stream has none, so a resumed text answer would be added next to the saved one).
  ui: {
    title: "useChat · DefaultChatTransport",
    render: () => <ChatPanel transport={uiTransport} storageKey="chat:ui" resume />,
  },
  text: {
    title: "useChat · TextStreamChatTransport",
    render: () => <ChatPanel transport={textTransport} storageKey="chat:text" />,
  },
  token: { title: "fetch + ReadableStream · token mode", render: () => <TokenModeStream /> },
};

export function App() {
  const [user, setUser] = useState(undefined);
  const [problem, setProblem] = useState(null);
  const demo = new URLSearchParams(window.location.search).get("demo") ?? "ui";
  const { title, render } = DEMOS[demo] ?? DEMOS.ui;

  useEffect(() => {
    currentUser().then(setUser, () => setUser(null));
  }, []);

  async function signIn() {
    try {
      setUser(await signInAsGuest());
    } catch (caught) {
      setProblem(caught.message);
    }
  }

  return (
    <main>
      <nav>
        {Object.entries(DEMOS).map(([key, { title: label }]) => (
          <a key={key} href={`?demo=${key}`} aria-current={key === demo ? "page" : undefined}>
            {label}
          </a>
        ))}
      </nav>
      <h1>{title}</h1>
      {user ? (
        <p id="signed-in">
          Signed in as {user.kind} {user.id}
        </p>
      ) : (
        <p>
          <button id="sign-in" type="button" onClick={signIn} disabled={user === undefined}>
            Sign in as guest
          </button>
          {problem && <span role="alert"> {problem}</span>}
        </p>
      )}
      {render()}
    </main>
  );
}
