// Drives the demo page (`python -m proxy demo`) in headless Debian Chromium, as a newcomer would after
// `make run`: it signs in as a guest by itself, then asks questions. Prints one JSON line with what
// the page showed; tests/test_demo_page.py makes the assertions.
//
//   node demo-page.mjs URL SCREENSHOT_PATH [modes|reload|stop]
//
// modes:  a question in relay mode, then one in token mode: the status and answer of each.
// reload: the upstream holds after its first chunk; the page is reloaded mid-answer, then the upstream
//         is released: the page after the reload (questions, answers, status) and the upstream's events.
// stop:   the upstream holds after its first chunk and Stop is clicked: did the upstream see the
//         stream cancelled (the demo keeps a run alive 20 s without readers, so only the stop route can).
//
// The demo runs its emulated upstream in the same process, at /_emulator; its /_control API is there too.
import { chromium } from "playwright-core";

const [url, screenshot, scenario = "modes"] = process.argv.slice(2);
const WAIT = { timeout: 20_000 };
setTimeout(() => {
  console.error(`demo-page.mjs: ${scenario} did not finish within 60 s`);
  process.exit(3);
}, 60_000).unref();

const control = (path, init) => fetch(new URL(`/_emulator/_control/${path}`, url), init);
const post = (path, rule) =>
  control(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(rule ?? {}) });
const events = async (kind) => (await control(`events?kind=${kind}`)).json();

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  const violations = [];
  const pageErrors = [];
  page.on("console", (message) => {
    if (message.text().includes("Content Security Policy")) violations.push(message.text());
  });
  page.on("pageerror", (error) => pageErrors.push(error.message));
  const status = () => page.textContent("#status");
  const texts = (selector) => page.$$eval(selector, (elements) => elements.map((e) => e.textContent));
  const signedIn = () =>
    page.waitForFunction(() => document.getElementById("who").textContent.startsWith("guest"), null, WAIT);
  const settled = () =>
    page.waitForFunction(() => ["done", "error", "stopped"].includes(document.getElementById("status").textContent), null, WAIT);
  const firstChunkShown = () =>
    page.waitForFunction(() => document.querySelector(".assistant")?.textContent.length > 0, null, WAIT);
  async function ask(mode, question) {
    await page.selectOption("#mode", mode);
    await page.fill("#prompt", question);
    await page.click("#send");
  }

  await page.goto(url);
  await signedIn();
  const report = { violations, pageErrors };

  if (scenario === "modes") {
    report.answers = {};
    for (const mode of ["relay", "token"]) {
      await ask(mode, `volcanoes via ${mode}`);
      await settled();
      report.answers[mode] = { status: await status(), text: (await texts(".assistant")).at(-1) };
    }
  } else if (scenario === "reload") {
    report.onFirstLoad = { status: await status(), messages: await page.locator(".msg").count() };
    await post("reset");
    await post("faults", { op: "stream", hold_after: 1 });
    await ask("relay", "volcanoes after a reload");
    await firstChunkShown();
    report.beforeReload = { status: await status(), answer: (await texts(".assistant"))[0] };
    const chatId = await page.evaluate(() => JSON.parse(sessionStorage.getItem("workflow-bff-demo")).chatId);

    await page.reload();
    await signedIn();
    await firstChunkShown(); // the resumed answer, replayed from its first chunk; the upstream still holds
    report.afterReload = {
      status: await status(),
      questions: await texts(".user"),
      answers: await texts(".assistant"),
      sameChat: chatId === (await page.evaluate(() => JSON.parse(sessionStorage.getItem("workflow-bff-demo")).chatId)),
    };
    await post("release");
    await settled();
    report.finished = { status: await status(), questions: await texts(".user"), answers: await texts(".assistant") };
    report.upstream = { starts: (await events("stream_start")).length, ends: (await events("stream_end")).map((e) => e.reason) };
  } else if (scenario === "stop") {
    await post("reset");
    await post("faults", { op: "stream", hold_after: 1 });
    await ask("relay", "volcanoes to stop");
    await firstChunkShown();
    await page.click("#stop");
    const cancelled = await control("wait?kind=stream_end&reason=cancelled&timeout=10");
    await settled();
    report.stopped = {
      upstreamCancelled: cancelled.status === 200,
      status: await status(),
      answers: await texts(".assistant"),
    };
  } else {
    throw new Error(`unknown scenario ${scenario}`);
  }
  await page.screenshot({ path: screenshot });
  console.log(JSON.stringify(report));
} finally {
  await browser.close();
}
