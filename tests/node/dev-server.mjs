// Drives the example React app (examples/react-chat) as its README runs it: from Vite's dev server
// (`npm run dev`), which forwards /auth, /api and /_emulator to workflow-bff's demo (`make run`). In
// headless Debian Chromium, each of the three pages signs in as a guest in a fresh browser context and
// streams one answer while the emulated upstream holds back everything after the first chunk, so the
// text shown before the release proves the answer arrived in pieces through the dev server.
// tests/test_chat_browser.py makes the assertions.
//
//   node dev-server.mjs '{"url": "http://vite...", "emulator": "http://bff.../_emulator",
//                         "chromium": "/usr/bin/chromium", "screenshots": "dir", "question": "..."}'

import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2]);
const control = (path, init) => fetch(`${config.emulator}/_control/${path}`, init);
const WAIT = { timeout: 20_000 };
const MODES = { ui: "#messages li[data-role=assistant]", text: "#messages li[data-role=assistant]", token: "#answer" };
setTimeout(() => {
  console.error("dev-server.mjs did not finish within 100 s");
  process.exit(3);
}, 100_000).unref();

const browser = await chromium.launch({
  executablePath: config.chromium,
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
const report = { pageErrors: [] };
try {
  for (const [mode, answerSelector] of Object.entries(MODES)) {
    const context = await browser.newContext({ viewport: { width: 900, height: 700 } }); // no cookie yet
    const page = await context.newPage();
    page.on("pageerror", (error) => report.pageErrors.push(`${mode}: ${error.message}`));
    // Every call the page made to workflow-bff or its upstream, with the origin it went to.
    const calls = [];
    page.on("response", (response) => {
      const url = new URL(response.url());
      if (/^\/(auth|api|_emulator)\//.test(url.pathname)) {
        calls.push({ method: response.request().method(), origin: url.origin, path: url.pathname, status: response.status() });
      }
    });
    const status = () => page.locator("#status").textContent();
    const answer = () => page.locator(answerSelector).last().textContent();

    await page.goto(`${config.url}/?demo=${mode}`);
    await page.waitForSelector("#sign-in:not([disabled])", WAIT);
    await page.click("#sign-in");
    // A refusal shows next to the button (role=alert); waiting for either keeps a 403 short to report.
    await page.waitForSelector("#signed-in, [role=alert]", WAIT);
    const signedIn = await page.locator("#signed-in").textContent({ timeout: 1_000 }).catch(() => null);
    const result = { signedIn, refusal: signedIn ? null : await page.locator("[role=alert]").first().textContent() };
    report[mode] = result;
    if (signedIn) {
      await control("reset", { method: "POST" });
      await control("faults", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ op: "stream", hold_after: 1 }),
      });
      await page.fill("#prompt", config.question);
      await page.click("#send");
      // The first chunk, or an error (a refused or failed stream) to report instead of timing out.
      await page.waitForFunction(
        (selector) => [...document.querySelectorAll(selector)].at(-1)?.textContent || document.querySelector("#error"),
        answerSelector,
        WAIT,
      );
      const error = await page.locator("#error").textContent({ timeout: 100 }).catch(() => null);
      result.held = { status: await status(), text: await answer(), ...(error && { error }) };
      await control("release", { method: "POST" });
      await page.waitForFunction(() => ["ready", "error"].includes(document.querySelector("#status")?.textContent), null, WAIT);
      result.done = { status: await status(), text: await answer(), error: await page.locator("#error").count() };
    }
    result.calls = calls;
    await page.screenshot({ path: `${config.screenshots}/dev-server-${mode}.png`, fullPage: true });
    await context.close();
  }
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(report));
