import { useChat } from "@ai-sdk/react";
import { useEffect, useState } from "react";
import { saveMessages, savedChat, stopChat } from "./session.js";

// One chat UI for any transport: see App.jsx for the two relay transports. `storageKey` names where
// this tab keeps the chat's id and messages (sessionStorage), so a reload continues the same chat.
export function ChatPanel({ transport, storageKey, resume = false }) {
  const [saved] = useState(() => savedChat(storageKey));
  // resume: true asks GET /api/chat/{alias}/{id}/stream on load. If the chat's answer is still being
  // generated (or just ended), workflow-bff replays it from the start with the same message id, so it
  // replaces the saved partial message; otherwise it answers 204 and the chat stays ready.
  const { id, messages, sendMessage, status, error, stop, regenerate } = useChat({
    id: saved.id,
    messages: saved.messages,
    transport,
    resume,
  });
  const [input, setInput] = useState("");
  const [stopProblem, setStopProblem] = useState(null);
  const busy = status === "submitted" || status === "streaming";

  useEffect(() => saveMessages(storageKey, messages), [storageKey, messages]);

  function submit(event) {
    event.preventDefault();
    if (!input.trim() || busy) return;
    sendMessage({ text: input });
    setInput("");
  }

  // stop() aborts the browser's request; the answer goes on being generated on the server (for a
  // reload to resume) until the chat's stop route ends it.
  function stopAnswer() {
    stop();
    setStopProblem(null);
    stopChat(id).catch((caught) => setStopProblem(caught.message));
  }

  return (
    <section className="chat">
      <ol id="messages">
        {messages.map((message) => (
          <li key={message.id} className={`message ${message.role}`} data-role={message.role}>
            {message.parts.map((part, index) => (part.type === "text" ? <span key={index}>{part.text}</span> : null))}
          </li>
        ))}
      </ol>
      {/* useChat shows the relay's error text as is: short plain text before streaming, in-band after. */}
      {error && (
        <p id="error" role="alert">
          {error.message}
        </p>
      )}
      {stopProblem && (
        <p id="stop-error" role="alert">
          {stopProblem}
        </p>
      )}
      <form onSubmit={submit}>
        <input id="prompt" value={input} onChange={(event) => setInput(event.target.value)} placeholder="Ask the tutor…" />
        <button id="send" type="submit" disabled={busy}>
          Send
        </button>
        <button id="stop" type="button" onClick={stopAnswer} disabled={!busy}>
          Stop
        </button>
        <button id="regenerate" type="button" onClick={() => regenerate()} disabled={busy || messages.length === 0}>
          Regenerate
        </button>
      </form>
      <p className="status">
        status: <output id="status">{status}</output>
      </p>
    </section>
  );
}
