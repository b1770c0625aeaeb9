// Drives workflow-bff's /api/chat/{alias} with a real AI SDK client and reports what the client saw.
//
//   node chat-client.mjs '{"client": "ai-7", "protocol": "ui", "proxy": "http://...", "emulator": "http://..."}'
//
// client: ai-7 | ai-6 | ai-5 | ai-5-strict (AbstractChat + DefaultChatTransport or, for protocol
// "text", TextStreamChatTransport) or ui-utils (AI SDK 4's callChatApi, protocol "data" or "text").
// Prints one JSON object: per scenario, the chat's status, error and messages, and the inputs the
// emulated upstream received. tests/test_chat_node.py makes the assertions.

const config = JSON.parse(process.argv[2]);
const alias = config.alias ?? "tutor";
const control = (path, init) => fetch(`${config.emulator}/_control/${path}`, init);
const fault = (rule) =>
  control("faults", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(rule) });
const upstreamInputs = async () =>
  (await (await control("requests")).json()).filter((r) => r.op === "stream").map((r) => r.body);
const streamEnds = async () => (await (await control("events?kind=stream_end")).json()).length;

// The client's fetch, passed through, also keeps the first bytes of every response body as received,
// before the client parses them: keep-alives are invisible in what the client shows.
const rawStarts = [];
async function recordingFetch(input, init) {
  const response = await fetch(input, init);
  if (!response.body) return response;
  const decoder = new TextDecoder();
  let head = "";
  const tap = new TransformStream({
    transform(chunk, controller) {
      if (head.length < 64) head += decoder.decode(chunk, { stream: true });
      controller.enqueue(chunk);
    },
    flush() {
      rawStarts.push(head.slice(0, 64));
    },
  });
  const { status, statusText, headers } = response;
  return new Response(response.body.pipeThrough(tap), { status, statusText, headers });
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

// AI SDK 5, 6 and 7: the framework-free Chat base class with a plain in-memory state.
async function sdkChat(cookie, apiAlias = alias) {
  const ai = await import(config.client);
  const listeners = new Set();
  const state = {
    status: "ready",
    error: undefined,
    messages: [],
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
  const chat = new Chat({ id: `chat-${config.client}`, transport, state });
  return {
    send: (text, extra = {}) => chat.sendMessage({ text, ...extra }),
    regenerate: () => chat.regenerate(),
    resume: () => chat.resumeStream(),
    onUpdate: (listener) => listeners.add(listener),
    report: () => ({
      status: chat.status,
      error: chat.error?.message ?? null,
      messages: chat.messages.map((m) => ({ id: m.id, role: m.role, text: textOf(m) })),
      firstUserParts: chat.messages[0]?.parts.map((p) => p.type) ?? [],
    }),
    messageIds: () => chat.messages.map((m) => m.id),
  };
}

// AI SDK 4 (and 3.x's wire format): callChatApi is what useChat of @ai-sdk/react 1.x runs per turn.
async function v4Chat(cookie, apiAlias = alias) {
  const { callChatApi, generateId } = await import("@ai-sdk/ui-utils");
  const listeners = new Set();
  let messages = [];
  let status = "ready";
  let error = null;
  const query = `?protocol=${config.protocol}`;
  const send = async (text) => {
    messages = [...messages, { id: generateId(), role: "user", content: text, parts: [{ type: "text", text }] }];
    const before = messages;
    status = "submitted";
    error = null;
    try {
      await callChatApi({
        api: `${config.proxy}/api/chat/${apiAlias}${query}`,
        // What use-chat.ts of @ai-sdk/react 1.2.12 sends by default.
        body: { id: "chat-v4", messages: before.map(({ role, content, parts }) => ({ role, content, parts })) },
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
        lastMessage: undefined,
      });
      status = "ready";
    } catch (caught) {
      status = "error";
      error = caught.message;
    }
  };
  return {
    send,
    onUpdate: (listener) => listeners.add(listener),
    report: () => ({
      status,
      error,
      messages: messages.map((m) => ({ id: m.id, role: m.role, text: textOf(m) })),
    }),
    messageIds: () => messages.map((m) => m.id),
  };
}

async function newChat(cookie, apiAlias) {
  return config.client === "ui-utils" ? v4Chat(cookie, apiAlias) : sdkChat(cookie, apiAlias);
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
  const chat = await newChat(cookie, "no-such-workflow");
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
    // The transport asks GET {api}/{chatId}/stream, so only an api URL without a query string works.
    await scenario("resume", async () => {
      const chat = await newChat(cookie);
      await chat.resume();
      return chat.report();
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
    return { rawStart: rawStarts.at(-1), ...chat.report() };
  });
}

process.stdout.write(JSON.stringify(report));
