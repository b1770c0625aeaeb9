import { useChat } from "@ai-sdk/react";
import { useState } from "react";

// One chat UI for any transport: see App.jsx for the two relay transports.
export function ChatPanel({ transport, resume = false }) {
  // resume: true asks GET /api/chat/{alias}/{id}/stream on load; workflow-bff answers 204 (nothing to
  // resume), which leaves the chat ready instead of in error.
  const { messages, sendMessage, status, error, stop, regenerate } = useChat({ transport, resume });
  const [input, setInput] = useState("");
  const busy = status === "submitted" || status === "streaming";

  function submit(event) {
    event.preventDefault();
    if (!input.trim() || busy) return;
    sendMessage({ text: input });
    setInput("");
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
      <form onSubmit={submit}>
        <input id="prompt" value={input} onChange={(event) => setInput(event.target.value)} placeholder="Ask the tutor…" />
        <button id="send" type="submit" disabled={busy}>
          Send
        </button>
        <button id="stop" type="button" onClick={() => stop()} disabled={!busy}>
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
