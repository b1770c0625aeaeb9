// Drives the example React app (examples/react-chat, useChat + DefaultChatTransport) in headless
// Debian Chromium and reports what the page showed; tests/test_chat_browser.py makes the assertions.
// The relay keeps a run going for a while without readers (BFF_RESUME_GRACE_SECONDS), so Stop must
// call the chat's stop route, and a reload mid-answer resumes it (useChat({ id, resume: true })).
//
//   node browser.mjs '{"url": "http://...", "emulator": "http://...", "screenshot": "path.png"}'

import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2]);
const control = (path, init) => fetch(`${config.emulator}/_control/${path}`, init);
const fault = (rule) =>
  control("faults", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(rule) });
const WAIT = { timeout: 20_000 };
setTimeout(() => {
  console.error("browser.mjs did not finish within 100 s");
  process.exit(3);
}, 100_000).unref();

const browser = await chromium.launch({
  executablePath: config.chromium ?? "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const report = { consoleErrors: [] };
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 900 } });
  page.on("pageerror", (error) => report.consoleErrors.push(error.message));
  // The chat routes the page called: resume GETs with their status, and stop POSTs.
  const resumes = [];
  const stops = [];
  page.on("response", (response) => {
    const { pathname } = new URL(response.url());
    const method = response.request().method();
    if (method === "GET" && /^\/api\/chat\/tutor\/[^/]+\/stream$/.test(pathname)) resumes.push({ path: pathname, status: response.status() });
    if (method === "POST" && /^\/api\/chat\/tutor\/[^/]+\/stop$/.test(pathname)) stops.push({ path: pathname, status: response.status() });
  });
  const chatId = () => page.evaluate(() => sessionStorage.getItem("chat:ui:id"));

  const status = () => page.locator("#status").textContent();
  const settled = () => page.waitForFunction(() => ["ready", "error"].includes(document.querySelector("#status")?.textContent), null, WAIT);
  const assistantTexts = () => page.locator("#messages li[data-role=assistant]").allTextContents();
  async function send(text) {
    await page.fill("#prompt", text);
    await page.click("#send");
  }

  await page.goto(`${config.url}/?demo=ui`);
  // useChat({resume: true}) asked for a stream to resume on load; the 204 must leave it ready.
  await page.waitForSelector("#sign-in:not([disabled])", WAIT);
  await settled();
  report.onLoad = { status: await status(), error: await page.locator("#error").count(), chatId: await chatId(), resumes: [...resumes] };

  await page.click("#sign-in");
  await page.waitForSelector("#signed-in", WAIT);

  // 1. An answer streams in.
  await send("first question");
  await page.waitForFunction(() => document.querySelectorAll("#messages li[data-role=assistant]").length === 1, null, WAIT);
  await settled();
  report.answered = { status: await status(), answers: await assistantTexts() };

  // 2. Stop mid-stream: the upstream holds after its first chunk; stop() must cancel it upstream.
  await control("reset", { method: "POST" });
  await fault({ op: "stream", hold_after: 1 });
  await send("question to stop");
  await page.waitForFunction(
    () => {
      const answers = document.querySelectorAll("#messages li[data-role=assistant]");
      return answers.length === 2 && answers[1].textContent.length > 0;
    },
    null,
    WAIT,
  );
  report.stopped = { statusWhileStreaming: await status() };
  await page.click("#stop");
  // Within 10 s, well inside the relay's grace period: only the stop route can have ended it this soon.
  const cancelled = await control("wait?kind=stream_end&reason=cancelled&timeout=10");
  await settled();
  Object.assign(report.stopped, {
    upstreamCancelled: cancelled.status === 200,
    status: await status(),
    answers: await assistantTexts(),
    stops: [...stops],
  });

  // 3. Reload mid-answer: the run goes on without a reader; useChat({ id, resume: true }) replays it.
  await control("reset", { method: "POST" });
  await fault({ op: "stream", hold_after: 1 });
  await send("question to resume");
  await page.waitForFunction(
    () => {
      const answers = document.querySelectorAll("#messages li[data-role=assistant]");
      return answers.length === 3 && answers[2].textContent.length > 0;
    },
    null,
    WAIT,
  );
  const chatBeforeReload = await chatId();
  await page.reload();
  await page.waitForSelector("#signed-in", WAIT);
  await page.waitForFunction(() => document.querySelector("#status")?.textContent === "streaming", null, WAIT);
  report.resumed = { sameChat: (await chatId()) === chatBeforeReload, statusWhileHeld: await status() };
  await control("release", { method: "POST" });
  await settled();
  Object.assign(report.resumed, {
    status: await status(),
    questions: await page.locator("#messages li[data-role=user]").allTextContents(),
    answers: await assistantTexts(),
    resumes: resumes.slice(1),
    upstreamStarts: (await (await control("events?kind=stream_start")).json()).length,
  });

  // 4. The upstream is out of credits: useChat shows the relay's short plain-text error.
  await control("reset", { method: "POST" });
  await fault({ op: "stream", status: 402 });
  await send("question without credits");
  await page.waitForSelector("#error", WAIT);
  await settled();
  report.refused = { status: await status(), error: await page.locator("#error").textContent() };

  await page.screenshot({ path: config.screenshot, fullPage: true });
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(report));
