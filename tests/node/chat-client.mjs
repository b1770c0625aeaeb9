// Drives workflow-bff's /api/chat/{alias} with a real AI SDK client and reports what the client saw.
//
//   node chat-client.mjs '{"client": "ai-7", "protocol": "ui", "proxy": "http://...", "emulator": "http://..."}'
//
// client: ai-7 | ai-6 | ai-5 | ai-5-strict (AbstractChat + DefaultChatTransport or, for protocol
// "text", TextStreamChatTransport) or ui-utils (AI SDK 4's callChatApi, protocol "data" or "text").
// Prints one JSON object: per scenario, the chat's status, error and messages, and the inputs the
// emulated upstream received. tests/test_chat_node.py and tests/test_resume_node.py make the
// assertions.
//
// Optional: `only` (scenario names to run), `resumeProxy` (the balancer sends every GET there: a
// second replica), `handshake` (at a pause the script prints `{"pause": ...}` as one line and waits
// for a line on stdin, so the test can check the servers in between), `timeoutMs`.

const config = JSON.parse(process.argv[2]);
const alias = config.alias ?? "tutor";
// Bounded in time whatever happens: a hung client fails the test instead of holding it.
setTimeout(() => {
  process.stderr.write(`chat-client.mjs: still running after ${config.timeoutMs ?? 80000} ms\n`);
  process.exit(2);
}, config.timeoutMs ?? 80000).unref();

const control = (path, init) => fetch(`${config.emulator}/_control/${path}`, init);
const fault = (rule) =>
  control("faults", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(rule) });
const release = () => control("release", { method: "POST" });
const upstreamInputs = async () =>
  (await (await control("requests")).json()).filter((r) => r.op === "stream").map((r) => r.body);
const streamEnds = async () => (await (await control("events?kind=stream_end")).json()).length;

// The client's fetch, passed through, also keeps what every response started with as received,
// before the client parses it (keep-alives are invisible in what the client shows), and can cut a
// response's connection mid-body the way a dropped network or a closed tab does. With `resumeProxy`
// it plays the balancer: GETs (resumes) go to the other replica.
const responses = [];
const HEAD_CHARS = 512;
async function recordingFetch(input, init = {}) {
  const method = init.method ?? "GET";
  let url = String(input);
  if (config.resumeProxy && method === "GET") url = url.replace(config.proxy, config.resumeProxy);
  const cutter = new AbortController();
  const signal = init.signal ? AbortSignal.any([init.signal, cutter.signal]) : cutter.signal;
  const response = await fetch(url, { ...init, signal });
  const record = {
    method,
    url,
    status: response.status,
    runId: response.headers.get("x-run-id"),
    contentType: response.headers.get("content-type"),
    streamHeader: response.headers.get("x-vercel-ai-ui-message-stream") ?? response.headers.get("x-vercel-ai-data-stream"),
    head: "",
    cut: () => cutter.abort(new TypeError("network connection lost")),
  };
  responses.push(record);
  if (!response.body) return response;
  const decoder = new TextDecoder();
  const tap = new TransformStream({
    transform(chunk, controller) {
      if (record.head.length < HEAD_CHARS) record.head = (record.head + decoder.decode(chunk, { stream: true })).slice(0, HEAD_CHARS);
      controller.enqueue(chunk);
    },
  });
  const { status, statusText, headers } = response;
  return new Response(response.body.pipeThrough(tap), { status, statusText, headers });
}
const described = ({ cut, ...record }) => record;
const startMessageId = (record) => record.head.match(/"type":"start","messageId":"([^"]+)"/)?.[1] ?? null;

let stdinLines;
async function pause(what, details = {}) {
  if (!config.handshake) return;
  if (!stdinLines) {
    const { createInterface } = await import("node:readline");
    stdinLines = createInterface({ input: process.stdin });
    stdinLines.iterator = stdinLines[Symbol.asyncIterator]();
  }
  process.stdout.write(JSON.stringify({ pause: what, ...details }) + "\n");
  const { done } = await stdinLines.iterator.next();
  if (done) throw new Error(`stdin closed at the pause "${what}"`);
}

async function signIn() {
  const response = await fetch(`${config.proxy}/auth/guest`, { method: "POST", headers: { "X-CSRF": "1" } });
  if (!response.ok) throw new Error(`guest sign-in failed: ${response.status}`);
  // Node's fetch has no cookie jar: carry the session cookie by hand, as a browser would.
  return response.headers.getSetCookie()[0].split(";")[0];
}

const textOf = (message) =>
  message.parts
    ? message.parts.filter((p) => p.type === "text").map((p) => p.text).join("")
    : message.content;

// AI SDK 5, 6 and 7: the framework-free Chat base class with a plain in-memory state. A page: `chatId`
// and `messages` are what the app loads for it (a reload passes the chat's saved messages).
async function sdkChat(cookie, { alias: apiAlias = alias, chatId = `chat-${config.client}`, messages = [] } = {}) {
  const ai = await import(config.client);
  const listeners = new Set();
  const state = {
    status: "ready",
    error: undefined,
    messages,
    pushMessage(message) {
      this.messages = [...this.messages, message];
      listeners.forEach((listener) => listener(this.messages));
    },
    popMessage() { this.messages = this.messages.slice(0, -1); },
    replaceMessage(index, message) {
      this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
      listeners.forEach((listener) => listener(this.messages));
    },
    snapshot: (value) => structuredClone(value),
  };
  class Chat extends ai.AbstractChat {}
  const Transport = config.protocol === "text" ? ai.TextStreamChatTransport : ai.DefaultChatTransport;
  const query = config.protocol === "ui" ? "" : `?protocol=${config.protocol}`;
  const transport = new Transport({
    api: `${config.proxy}/api/chat/${apiAlias}${query}`,
    headers: { Cookie: cookie, "X-CSRF": "1" },
    fetch: recordingFetch,
  });
  const chat = new Chat({ id: chatId, transport, state });
  return {
    send: (text, extra = {}) => chat.sendMessage({ text, ...extra }),
    regenerate: () => chat.regenerate(),
    resume: () => chat.resumeStream(),
    // The wire level: what `reconnectToStream` gives, assembled by `readUIMessageStream`.
    reconnect: async () => {
      const stream = await transport.reconnectToStream({ chatId });
      if (stream === null) return null;
      let message = null;
      const errors = [];
      for await (const snapshot of ai.readUIMessageStream({ stream, onError: (e) => errors.push(e.message) })) {
        message = snapshot;
      }
      return { id: message?.id ?? null, text: message ? textOf(message) : null, errors };
    },
    onUpdate: (listener) => listeners.add(listener),
    offUpdate: (listener) => listeners.delete(listener),
    report: () => ({
      status: chat.status,
      error: chat.error?.message ?? null,
      messages: chat.messages.map((m) => ({ id: m.id, role: m.role, text: textOf(m) })),
      firstUserParts: chat.messages[0]?.parts.map((p) => p.type) ?? [],
    }),
    messageIds: () => chat.messages.map((m) => m.id),
    saved: () => structuredClone(chat.messages),
  };
}

// AI SDK 4 (and 3.x's wire format): callChatApi is what useChat of @ai-sdk/react 1.x runs per turn,
// and, with `requestType: "resume"`, what its `experimental_resume()` runs.
async function v4Chat(cookie, { alias: apiAlias = alias, chatId = "chat-v4", messages: saved = [] } = {}) {
  const { callChatApi, generateId } = await import("@ai-sdk/ui-utils");
  const listeners = new Set();
  let messages = saved;
  let status = "ready";
  let error = null;
  const query = `?protocol=${config.protocol}`;
  const request = async (before, requestType) => {
    status = "submitted";
    error = null;
    try {
      await callChatApi({
        // experimental_resume appends `?chatId=...` to the api, so it can carry no query of its own:
        // the resume route's default is the data protocol.
        api: `${config.proxy}/api/chat/${apiAlias}${requestType === "resume" ? "" : query}`,
        // What use-chat.ts of @ai-sdk/react 1.2.12 sends by default.
        body: { id: chatId, messages: before.map(({ role, content, parts }) => ({ role, content, parts })) },
        streamProtocol: config.protocol,
        credentials: undefined,
        headers: { Cookie: cookie, "X-CSRF": "1" },
        abortController: () => new AbortController(),
        restoreMessagesOnFailure: () => { messages = before; },
        onResponse: undefined,
        onUpdate: ({ message }) => {
          status = "streaming";
          messages = [...before, message];
          listeners.forEach((listener) => listener(messages));
        },
        onFinish: undefined,
        onToolCall: undefined,
        generateId,
        fetch: recordingFetch,
        lastMessage: before.at(-1),
        requestType,
      });
      status = "ready";
    } catch (caught) {
      status = "error";
      error = caught.message;
    }
  };
  return {
    send: (text) => {
      messages = [...messages, { id: generateId(), role: "user", content: text, parts: [{ type: "text", text }] }];
      return request(messages, "generate");
    },
    resume: () => request(messages, "resume"),
    onUpdate: (listener) => listeners.add(listener),
    offUpdate: (listener) => listeners.delete(listener),
    report: () => ({
      status,
      error,
      messages: messages.map((m) => ({ id: m.id, role: m.role, text: textOf(m) })),
    }),
    messageIds: () => messages.map((m) => m.id),
    saved: () => structuredClone(messages),
  };
}

async function newChat(cookie, options) {
  return config.client === "ui-utils" ? v4Chat(cookie, options) : sdkChat(cookie, options);
}

// The assistant's text at the chat's next update that shows some.
function nextText(chat) {
  return new Promise((resolve) => {
    const listener = (messages) => {
      const last = messages.at(-1);
      if (last.role === "assistant" && textOf(last)) {
        chat.offUpdate(listener);
        resolve(textOf(last));
      }
    };
    chat.onUpdate(listener);
  });
}

// Each scenario starts from a clean emulator and ends with what the upstream received.
// config.only, when given, names the scenarios to run.
async function scenario(name, body) {
  if (config.only && !config.only.includes(name)) return;
  await control("reset", { method: "POST" });
  const result = await body();
  report[name] = { ...result, upstream: await upstreamInputs() };
}

const report = {};
const cookie = await signIn();
const CUT_QUESTION = "question cut short";
const unique = (what) => `${what}-${config.client}-${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
const sdk = config.client !== "ui-utils";

await scenario("conversation", async () => {
  const chat = await newChat(cookie);
  await chat.send("first question");
  const afterFirst = chat.report();
  await chat.send("second question");
  return { afterFirst, ...chat.report() };
});

await scenario("incremental", async () => {
  // The upstream holds back everything after its first chunk until released.
  await fault({ op: "stream", hold_after: 1 });
  const chat = await newChat(cookie);
  const firstDelta = new Promise((resolve) =>
    chat.onUpdate((messages) => {
      const last = messages.at(-1);
      if (last.role === "assistant" && textOf(last)) resolve(textOf(last));
    }),
  );
  const sending = chat.send("incremental question");
  const textAtFirstDelta = await firstDelta;
  const streamEndsAtFirstDelta = await streamEnds();
  await control("release", { method: "POST" });
  await sending;
  return { textAtFirstDelta, streamEndsAtFirstDelta, ...chat.report() };
});

await scenario("cut", async () => {
  await fault({ op: "stream", cut_after: 3 });
  const chat = await newChat(cookie);
  await chat.send("question that breaks");
  return chat.report();
});

await scenario("refused", async () => {
  await fault({ op: "stream", status: 402 });
  const chat = await newChat(cookie);
  await chat.send("question without credits");
  return chat.report();
});

await scenario("unknown", async () => {
  const chat = await newChat(cookie, { alias: "no-such-workflow" });
  await chat.send("hello?");
  return chat.report();
});

if (sdk) {
  await scenario("regenerate", async () => {
    const chat = await newChat(cookie);
    await chat.send("first question");
    await chat.send("second question");
    const before = chat.messageIds();
    await chat.regenerate();
    return { idsBefore: before, ...chat.report() };
  });

  await scenario("edit", async () => {
    const chat = await newChat(cookie);
    await chat.send("first question");
    await chat.send("second question");
    const [firstUserId] = chat.messageIds();
    await chat.send("first question, edited", { messageId: firstUserId });
    return chat.report();
  });

  if (config.protocol === "ui") {
    // useChat({ resume: true }) on a chat that never ran: the transport asks GET {api}/{chatId}/stream
    // (so only an api URL without a query string works), gets a 204 and stays out of the error state.
    await scenario("resume", async () => {
      const chat = await newChat(cookie, { chatId: unique("never-ran") });
      await chat.resume();
      return { response: described(responses.at(-1)), ...chat.report() };
    });
  }

  await scenario("image", async () => {
    const chat = await newChat(cookie);
    const files = [{ type: "file", mediaType: "image/png", url: "https://images.example/cat.png" }];
    await chat.send("what is in this picture?", { files });
    return chat.report();
  });
}

if (config.only?.includes("keepalive")) {
  // Against a proxy with a short BFF_MAX_STREAM_SECONDS, so keep-alives come before the upstream answers.
  await scenario("keepalive", async () => {
    await fault({ op: "stream", stall: config.stall });
    const chat = await newChat(cookie);
    await chat.send("slow question");
    return { rawStart: responses.at(-1).head.slice(0, 64), ...chat.report() };
  });
}

if (config.only?.includes("cut-resume")) {
  // A page asks; its connection is cut after the first text, while the upstream holds the rest back
  // (a closed tab, a dropped network). The page is reloaded: a new Chat of the same chat id, showing
  // the saved user message, resumes as useChat({ resume: true }) (AI SDK 4: experimental_resume)
  // does on mount, while the upstream still holds back; then the upstream goes on. After the run
  // ended, the chat is resumed once more: a run is kept for BFF_RESUME_SECONDS after its end.
  // Against a proxy with BFF_RESUME_GRACE_SECONDS > 0, with `handshake`: at the pause "cut" the test
  // checks that the proxy saw the client leave and kept the upstream open.
  await scenario("cut-resume", async () => {
    const chatId = unique("cut");
    await fault({ op: "stream", hold_after: 1 });
    const first = await newChat(cookie, { chatId });
    const firstText = nextText(first);
    const sending = first.send(CUT_QUESTION);
    // (null, not a hang, if the answer ends without any text)
    const textAtCut = await Promise.race([firstText, sending.then(() => null)]);
    const post = responses.at(-1);
    post.cut();
    await sending;
    const afterCut = first.report();
    await pause("cut", { runId: post.runId });

    const reloaded = await newChat(cookie, { chatId, messages: first.saved().filter((m) => m.role === "user") });
    const replayed = nextText(reloaded);
    const resuming = reloaded.resume();
    const textReplayed = await Promise.race([replayed, resuming.then(() => null)]);
    const streamEndsAtReplay = await streamEnds();
    await release();
    await resuming;
    const resumed = reloaded.report();

    let afterEnd;
    if (sdk) {
      afterEnd = await reloaded.reconnect(); // the wire level: reconnectToStream + readUIMessageStream
    } else {
      const again = await newChat(cookie, { chatId, messages: first.saved().filter((m) => m.role === "user") });
      await again.resume();
      afterEnd = again.report();
    }
    return {
      post: described(post),
      postMessageId: startMessageId(post),
      textAtCut,
      afterCut,
      textReplayed,
      streamEndsAtReplay,
      resumed,
      afterEnd,
      resumes: responses.filter((r) => r.method === "GET").map(described),
    };
  });
}

if (config.only?.includes("resume-none")) {
  // A page loads a chat that has no run (AI SDK 4's experimental_resume on mount, or useChat's
  // resume): nothing to show, no error, the saved messages kept.
  await scenario("resume-none", async () => {
    const saved = await newChat(cookie);
    await saved.send("earlier question");
    const chat = await newChat(cookie, { chatId: unique("unknown"), messages: saved.saved() });
    let updates = 0;
    chat.onUpdate(() => (updates += 1));
    await chat.resume();
    return { response: described(responses.at(-1)), updates, ...chat.report() };
  });
}

process.stdout.write(JSON.stringify(report) + "\n");
stdinLines?.close();
