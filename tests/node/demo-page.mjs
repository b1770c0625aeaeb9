// Drives the demo page (`python -m proxy demo`) in headless Debian Chromium, as a newcomer would after
// `make run`: it signs in as a guest by itself, then asks questions. Prints one JSON line with what
// the page showed; tests/test_demo_page.py makes the assertions.
//
//   node demo-page.mjs URL ARTIFACT_DIR [modes|reload|stop|layout:WIDTHxHEIGHT]
//
// Every scenario reports what the console and the network showed while the page loaded (errors,
// answers of 400 and above) and saves screenshots as ARTIFACT_DIR/demo-<scenario>-<step>.png.
//
// modes:  a question in relay mode, then one in token mode: the status, answer and mode badge of each;
//         then one the upstream refuses (402): the error shown in place of the answer.
// reload: the upstream holds after its first chunk; the page is reloaded mid-answer, then the upstream
//         is released: the page after the reload (questions, answers, status) and the upstream's events.
// stop:   the upstream holds after its first chunk and Stop is clicked: did the upstream see the
//         stream cancelled (the demo keeps a run alive 20 s without readers, so only the stop route can).
// layout: at one viewport size, the page when idle, while streaming (then stopped) and with a chat
//         longer than the screen: horizontal overflow, and for every control whether it lies inside the
//         viewport and is the element found at its centre (not covered). The controls are found and
//         used by their accessible names, with the keyboard on a desktop-sized screen.
// oidc:WIDTHxHEIGHT: the demo configured for OpenID Connect against tests/node/oidc-idp.mjs: the
//         guest's header with "Sign in" (where it lies, where it leads), signing in through the
//         provider's login and consent pages back to the page, the header then (name, Sign out),
//         signing out through the provider's logout page back to a guest, and /?auth_error=... shown.
//         Console messages and CSP reports count only while the page is on the demo's origin.
//
// The demo runs its emulated upstream in the same process, at /_emulator; its /_control API is there too.
import { chromium } from "playwright-core";
import { join } from "node:path";

const [url, artifacts, scenario = "modes"] = process.argv.slice(2);
const WAIT = { timeout: 20_000 };
setTimeout(() => {
  console.error(`demo-page.mjs: ${scenario} did not finish within 80 s`);
  process.exit(3);
}, 80_000).unref();

const control = (path, init) => fetch(new URL(`/_emulator/_control/${path}`, url), init);
const post = (path, rule) =>
  control(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(rule ?? {}) });
const events = async (kind) => (await control(`events?kind=${kind}`)).json();

const layout = /^layout:(\d+)x(\d+)$/.exec(scenario);
const oidc = /^oidc:(\d+)x(\d+)$/.exec(scenario);
const sized = layout ?? oidc;
const viewport = sized ? { width: Number(sized[1]), height: Number(sized[2]) } : { width: 1280, height: 800 };
const name = sized ? `${scenario.split(":")[0]}-${viewport.width}` : scenario;
const origin = new URL(url).origin;
const screenshots = [];

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const context = await browser.newContext({ viewport, deviceScaleFactor: 1 });
  // The test provider's pages load web fonts; nothing but loopback is reached.
  await context.route((target) => !["127.0.0.1", "localhost"].includes(target.hostname), (route) => route.abort());
  const page = await context.newPage();
  const onDemo = () => page.url().startsWith(origin);
  const violations = [];
  const pageErrors = [];
  const consoleErrors = [];
  const failedResponses = [];
  page.on("console", (message) => {
    if (!onDemo()) return; // the identity provider's own pages are not ours to judge
    if (message.text().includes("Content Security Policy")) violations.push(message.text());
    if (message.type() === "error") consoleErrors.push(message.text());
  });
  page.on("pageerror", (error) => pageErrors.push(error.message));
  page.on("response", (response) => {
    if (response.status() >= 400) failedResponses.push(`${response.status()} ${new URL(response.url()).pathname}`);
  });

  const state = () => page.getAttribute("#status", "data-state");
  const texts = (selector) => page.$$eval(selector, (elements) => elements.map((e) => e.textContent));
  const signedIn = () => page.waitForSelector('#app[data-session="guest"]', WAIT);
  const settled = () =>
    page.waitForFunction(() => ["done", "error", "stopped"].includes(document.getElementById("status").dataset.state), null, WAIT);
  const answersShown = (count) =>
    page.waitForFunction((n) => document.querySelectorAll(".assistant .text")[n - 1]?.textContent.length > 0, count, WAIT);
  const prompt = page.getByRole("textbox", { name: "Your question" });
  const button = (label) => page.getByRole("button", { name: label, exact: true });
  // The radio buttons are drawn by their labels (a segmented control): click the label, then check
  // that the radio of that accessible name is the one checked.
  const radio = (which) => page.getByRole("radio", { name: `${which[0].toUpperCase()}${which.slice(1)} mode`, exact: true });
  async function choose(which) {
    await page.click(`label[for="mode-${which}"]`);
    if (!(await radio(which).isChecked())) throw new Error(`the ${which} mode radio is not checked after a click on its label`);
  }
  async function ask(which, question) {
    await choose(which);
    await prompt.fill(question);
    await button("Send").click();
  }
  async function shoot(step) {
    const path = join(artifacts, `demo-${name}-${step}.png`);
    await page.screenshot({ path });
    screenshots.push(path);
  }
  const answers = () => texts(".assistant .text");
  const badges = () => texts(".assistant .badge.relay, .assistant .badge.token");

  // Where every control is, and what lies at its centre; how wide the document is.
  const geometry = (selectors) =>
    page.evaluate((selectors) => {
      const describe = (e) => (e ? `${e.tagName.toLowerCase()}${e.id ? `#${e.id}` : ""}.${[...e.classList].join(".")}` : "nothing");
      const controls = {};
      for (const selector of selectors) {
        const found = [...document.querySelectorAll(selector)];
        if (found.length === 0) controls[selector] = ["missing"];
        found.forEach((element, index) => {
          const r = element.getBoundingClientRect();
          const problems = [];
          if (r.width < 24 || r.height < 24) problems.push(`smaller than 24 px (${r.width}x${r.height})`);
          if (r.left < 0 || r.top < 0 || r.right > innerWidth || r.bottom > innerHeight) {
            problems.push(`outside the viewport (${r.left},${r.top})-(${r.right},${r.bottom})`);
          }
          const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
          if (!hit || !(hit === element || element.contains(hit))) problems.push(`covered by ${describe(hit)}`);
          controls[found.length > 1 ? `${selector}[${index}]` : selector] = problems;
        });
      }
      return {
        innerWidth,
        scrollWidth: Math.max(document.documentElement.scrollWidth, document.body.scrollWidth),
        controls,
      };
    }, selectors);
  const box = async (selector) => page.evaluate((s) => document.querySelector(s).getBoundingClientRect().toJSON(), selector);

  await page.goto(url);
  await signedIn();
  await page.waitForFunction(() => document.getElementById("status").textContent === "Ready.", null, WAIT);
  const report = {
    violations,
    pageErrors,
    onLoad: {
      consoleErrors: [...consoleErrors],
      failedResponses: [...failedResponses],
      logoLoaded: await page.$eval(".logo", (img) => img.complete && img.naturalWidth > 0),
      icon: await page.$eval('link[rel="icon"]', (link) => new URL(link.href).pathname),
    },
  };

  if (scenario === "modes") {
    report.answers = {};
    for (const which of ["relay", "token"]) {
      await ask(which, `volcanoes via ${which}`);
      await settled();
      report.answers[which] = {
        status: await state(),
        text: (await answers()).at(-1),
        badge: (await badges()).at(-1),
        hint: await page.textContent("#mode-hint"),
      };
    }
    // A refusal before the answer starts (the upstream account has no credits): shown in place.
    await post("reset");
    await post("faults", { op: "stream", status: 402 });
    await ask("relay", "volcanoes without credits");
    await settled();
    report.refused = {
      status: await state(),
      alerts: await page.$$eval(".assistant.failed [role=alert]", (els) => els.map((e) => e.textContent)),
      answer: (await answers()).at(-1),
      sendShown: await page.locator("#send").isVisible(),
    };
    await shoot("done");
  } else if (scenario === "reload") {
    report.onFirstLoad = { status: await state(), messages: await page.locator(".msg").count() };
    await post("reset");
    await post("faults", { op: "stream", hold_after: 1 });
    await ask("relay", "volcanoes after a reload");
    await answersShown(1);
    report.beforeReload = { status: await state(), answer: (await answers())[0] };
    const chatId = await page.evaluate(() => JSON.parse(sessionStorage.getItem("workflow-bff-demo")).chatId);

    await page.reload();
    await signedIn();
    await answersShown(1); // the resumed answer, replayed from its first chunk; the upstream still holds
    report.afterReload = {
      status: await state(),
      questions: await texts(".user .text"),
      answers: await answers(),
      sameChat: chatId === (await page.evaluate(() => JSON.parse(sessionStorage.getItem("workflow-bff-demo")).chatId)),
    };
    await shoot("resumed");
    await post("release");
    await settled();
    report.finished = { status: await state(), questions: await texts(".user .text"), answers: await answers() };
    report.upstream = { starts: (await events("stream_start")).length, ends: (await events("stream_end")).map((e) => e.reason) };
  } else if (scenario === "stop") {
    await post("reset");
    await post("faults", { op: "stream", hold_after: 1 });
    await ask("relay", "volcanoes to stop");
    await answersShown(1);
    await page.click("#stop");
    const cancelled = await control("wait?kind=stream_end&reason=cancelled&timeout=10");
    await settled();
    report.stopped = {
      upstreamCancelled: cancelled.status === 200,
      status: await state(),
      answers: await answers(),
      marked: await page.$$eval(".assistant.stopped .badge.plain", (els) => els.map((e) => e.textContent)),
    };
    await shoot("stopped");
  } else if (layout) {
    const keyboard = viewport.width >= 1024;
    const always = ["#prompt", 'label[for="mode-relay"]', 'label[for="mode-token"]'];
    report.idle = await geometry([...always, "#send", ".suggestion"]);
    await shoot("idle");

    // Waiting for the first word (the upstream stalls), then streaming, held after the first chunk:
    // the visible state, and Stop in place of Send.
    await post("reset");
    await post("faults", { op: "stream", stall: 30, hold_after: 1 });
    await choose("relay");
    const question = "How do volcanoes erupt?";
    if (keyboard) {
      await prompt.focus();
      await page.keyboard.type(question);
      await page.keyboard.press("Enter");
    } else {
      await prompt.fill(question);
      await button("Send").click();
    }
    await page.waitForSelector(".assistant.waiting", WAIT);
    report.waiting = {
      ...(await geometry([...always, "#stop"])),
      status: await state(),
      answer: (await answers())[0],
    };
    await shoot("waiting");
    await post("release"); // ends the stall; the stream then holds after its first chunk
    await answersShown(1);
    report.streaming = {
      ...(await geometry([...always, "#stop"])),
      status: await state(),
      statusText: await page.textContent("#status"),
      answer: (await answers())[0],
      sendHidden: await page.locator("#send").isHidden(),
      streamingShown: await page.locator(".assistant.streaming").count(),
      logBusy: await page.getAttribute("#log", "aria-busy"),
    };
    await shoot("streaming");
    if (keyboard) await page.keyboard.press("Escape");
    else await button("Stop").click();
    await settled();
    report.stopped = { status: await state(), focused: await page.evaluate(() => document.activeElement?.id) };

    // A chat longer than the screen, in both modes: the composer stays where it was.
    const composerBefore = await box("#ask");
    await post("faults", { op: "stream", delay: 0, times: 4 });
    const questions = ["Explain fractions to a 10 year old", "Why is the sky blue?", "What is photosynthesis?", "How do plants drink water?"];
    report.hints = {};
    for (const [index, asked] of questions.entries()) {
      const which = index % 2 ? "relay" : "token";
      await ask(which, asked);
      report.hints[which] = await page.textContent("#mode-hint");
      await settled();
    }
    const composerAfter = await box("#ask");
    report.chat = {
      ...(await geometry([...always, "#send"])),
      status: await state(),
      questions: questions,
      answers: (await answers()).slice(1),
      badges: (await badges()).slice(1),
      composerMoved: Math.abs(composerAfter.top - composerBefore.top) + Math.abs(composerAfter.bottom - composerBefore.bottom),
      composerAtBottom: Math.round(composerAfter.bottom) === viewport.height,
      lastAnswerInView: await page.evaluate(() => {
        const last = [...document.querySelectorAll(".assistant")].at(-1).getBoundingClientRect();
        return last.bottom <= document.getElementById("ask").getBoundingClientRect().top && last.bottom > 0;
      }),
      chatScrolls: await page.$eval("#chat", (chat) => chat.scrollHeight > chat.clientHeight),
    };
    await shoot("chat");
  } else if (oidc) {
    const keyboard = viewport.width >= 1024;
    const header = () => ({
      who: page.textContent("#who-text"),
      session: page.getAttribute("#app", "data-session"),
      intro: page.textContent("#intro-who"),
      signInShown: page.getByRole("link", { name: "Sign in", exact: true }).isVisible(),
      signOutShown: page.getByRole("button", { name: "Sign out", exact: true }).isVisible(),
    });
    const resolved = async (promises) =>
      Object.fromEntries(await Promise.all(Object.entries(promises).map(async ([k, v]) => [k, await v])));
    const signInLink = page.getByRole("link", { name: "Sign in", exact: true });
    report.guest = {
      ...(await resolved(header())),
      ...(await geometry(["#who", "#sign-in", "#prompt", "#send"])),
      href: await signInLink.getAttribute("href"),
    };
    await shoot("guest");

    // Sign in: the link (by keyboard on a desktop), the provider's login and consent pages, and back.
    if (keyboard) {
      await signInLink.focus();
      await page.keyboard.press("Enter");
    } else {
      await signInLink.click();
    }
    await page.waitForSelector("input[name=login]", WAIT);
    report.loginPage = new URL(page.url()).host;
    await page.fill("input[name=login]", "alice");
    await page.fill("input[name=password]", "any");
    await page.click("button[type=submit]");
    await page.click('button:has-text("Continue")', WAIT); // the consent page
    await page.waitForSelector('#app[data-session="oidc"]', WAIT);
    await page.waitForFunction(() => document.getElementById("status").textContent === "Ready.", null, WAIT);
    report.signedIn = {
      ...(await resolved(header())),
      ...(await geometry(["#who", "#sign-out", "#prompt", "#send"])),
      path: new URL(page.url()).pathname + new URL(page.url()).search,
      user: await page.evaluate(async () => (await (await fetch("/auth/session")).json()).user),
    };
    await ask("relay", "volcanoes as alice");
    await settled();
    report.signedIn.answer = { status: await state(), text: (await answers()).at(-1) };
    await shoot("signed-in");

    // Sign out: the BFF ends the session, the provider's logout page ends its own, and sends the
    // browser back to the demo, which signs in as a guest again.
    await page.getByRole("button", { name: "Sign out", exact: true }).click();
    await page.click("button[name=logout]", WAIT); // the provider asks while its session lives
    await page.waitForURL(`${origin}/`, WAIT);
    await signedIn();
    report.signedOut = await resolved(header());

    // A failed sign-in comes back with its code: shown in words, and gone from the address bar.
    await page.goto(`${origin}/?auth_error=access_denied`);
    await signedIn();
    await page.waitForSelector("#auth-error:not([hidden])", WAIT);
    report.authError = {
      text: await page.textContent("#auth-error"),
      role: await page.getAttribute("#auth-error", "role"),
      search: await page.evaluate(() => location.search),
      ...(await geometry(["#auth-error", "#sign-in"])),
    };
    await shoot("auth-error");
    await page.goto(`${origin}/?auth_error=%3Cb%3Enew%3C%2Fb%3E`);
    await page.waitForSelector("#auth-error:not([hidden])", WAIT);
    report.unknownAuthError = await page.textContent("#auth-error");
  } else {
    throw new Error(`unknown scenario ${scenario}`);
  }
  report.consoleErrors = consoleErrors;
  report.screenshots = screenshots;
  console.log(JSON.stringify(report));
} finally {
  await browser.close();
}
