// Drives the demo page (`python -m proxy demo`) in headless Debian Chromium, as a newcomer would after
// `make run`: it signs in as a guest by itself, then a question is asked in relay mode and in token
// mode. Prints one JSON line: the status and answer text of each, and any CSP violation the page hit.
// Usage: node tests/node/demo-page.mjs URL SCREENSHOT_PATH
import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  const violations = [];
  page.on("console", (message) => {
    if (message.text().includes("Content Security Policy")) violations.push(message.text());
  });
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("who").textContent.startsWith("guest"));
  const answers = {};
  for (const mode of ["relay", "token"]) {
    await page.selectOption("#mode", mode);
    await page.fill("#prompt", `volcanoes via ${mode}`);
    await page.click("#send");
    await page.waitForFunction(
      () => ["done", "error"].includes(document.getElementById("status").textContent), null, { timeout: 20000 });
    const texts = await page.$$eval(".assistant", (elements) => elements.map((e) => e.textContent));
    answers[mode] = { status: await page.textContent("#status"), text: texts.at(-1) };
  }
  await page.screenshot({ path: screenshot });
  console.log(JSON.stringify({ answers, violations }));
} finally {
  await browser.close();
}
