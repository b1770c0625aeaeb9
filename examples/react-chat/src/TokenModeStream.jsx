import { useRef, useState } from "react";
import { WORKFLOW, postJson } from "./session.js";

// Token mode without any SDK: workflow-bff mints a single-use upstream token for the signed-in user,
// and the browser streams the workflow straight from the upstream's stream_url with fetch.
// The inputs are the workflow's own (here its chat input, "message"), sent as they are.
export function TokenModeStream() {
  const [question, setQuestion] = useState("");
  const [answer, setAnswer] = useState("");
  const [status, setStatus] = useState("ready");
  const [error, setError] = useState(null);
  const controller = useRef(null);

  async function ask(event) {
    event.preventDefault();
    controller.current = new AbortController();
    setAnswer("");
    setError(null);
    setStatus("streaming");
    try {
      const { stream_url: streamUrl } = await postJson("/api/token", { workflow: WORKFLOW });
      const response = await fetch(streamUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ message: question }),
        signal: controller.current.signal,
      });
      if (!response.ok) throw new Error(`The workflow service answered ${response.status}.`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) {
        setAnswer((text) => text + chunk.value);
      }
      setStatus("ready");
    } catch (caught) {
      const stopped = caught.name === "AbortError";
      setStatus(stopped ? "ready" : "error");
      if (!stopped) setError(caught.message);
    }
  }

  return (
    <section className="chat">
      <p id="answer" className="message assistant">
        {answer}
      </p>
      {error && (
        <p id="error" role="alert">
          {error}
        </p>
      )}
      <form onSubmit={ask}>
        <input id="prompt" value={question} onChange={(event) => setQuestion(event.target.value)} />
        <button id="send" type="submit" disabled={status === "streaming"}>
          Ask
        </button>
        <button id="stop" type="button" onClick={() => controller.current?.abort()} disabled={status !== "streaming"}>
          Stop
        </button>
      </form>
      <p className="status">
        status: <output id="status">{status}</output>
      </p>
    </section>
  );
}
