// Signs in through the BFF's OpenID Connect routes in headless Debian Chromium, on the test provider's
// own login and consent pages (tests/node/oidc-idp.mjs), and reports what the browser ended up with;
// tests/test_oidc.py makes the assertions. The provider is on another site (localhost) than
// the BFF (127.0.0.1), so SameSite decides which cookies come along, as in production.
//
//   node oidc-browser.mjs '{"url": "http://127.0.0.1:...", "chromium": "/usr/bin/chromium"}'

import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2]);
const WAIT = { timeout: 20_000 };
setTimeout(() => {
  console.error("oidc-browser.mjs did not finish within 100 s");
  process.exit(3);
}, 100_000).unref();

const browser = await chromium.launch({
  executablePath: config.chromium ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-sync"],
});
const report = {};
try {
  const context = await browser.newContext();
  // The provider's development pages load web fonts; nothing but loopback is reached.
  await context.route((url) => !["127.0.0.1", "localhost"].includes(url.hostname), (route) => route.abort());
  const page = await context.newPage();
  const signIn = async (login) => {
    await page.fill("input[name=login]", login);
    await page.fill("input[name=password]", "any");
    await page.click("button[type=submit]");
  };

  // 1. Sign in, landing on returnTo: the session route, whose answer shows the session the browser holds.
  await page.goto(`${config.url}/auth/login?returnTo=/auth/session`);
  await page.waitForSelector("input[name=login]", WAIT);
  report.loginPage = new URL(page.url()).host;
  await signIn("alice");
  await page.click('button:has-text("Continue")', WAIT); // the consent page
  await page.waitForURL(`${config.url}/auth/session`, WAIT);
  report.session = JSON.parse(await page.locator("body").innerText());
  report.cookies = (await context.cookies(config.url)).map(({ name, httpOnly, sameSite, value }) => ({ name, httpOnly, sameSite, size: value.length }));

  // 2. Sign out: the BFF's logout, then the provider's logout page, which comes back to the app.
  const signedOut = await page.evaluate(async () => {
    const answer = await fetch("/auth/logout", { method: "POST", headers: { "X-CSRF": "1" } });
    return { status: answer.status, body: await answer.json() };
  });
  report.logoutStatus = signedOut.status;
  await page.goto(signedOut.body.logout_url);
  await page.click("button[name=logout]", WAIT); // the provider asks while its session lives
  await page.waitForURL(`${config.url}/`, WAIT);
  report.afterLogout = (await page.request.get(`${config.url}/auth/session`)).status();

  // 3. Cancel at the provider: back on the BFF with the provider's error code.
  const other = await browser.newContext();
  await other.route((url) => !["127.0.0.1", "localhost"].includes(url.hostname), (route) => route.abort());
  const second = await other.newPage();
  await second.goto(`${config.url}/auth/login?returnTo=/auth/session`);
  await second.waitForSelector("input[name=login]", WAIT);
  await second.click("text=[ Cancel ]");
  await second.waitForURL((url) => url.href.startsWith(config.url), WAIT);
  report.cancelled = second.url().slice(config.url.length);
  report.cancelledSession = (await second.request.get(`${config.url}/auth/session`)).status();
} catch (error) {
  report.error = String(error?.stack ?? error);
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(report));
