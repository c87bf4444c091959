// Real-browser acceptance test of the web UI: Debian's chromium driven by playwright-core
// against a real `ironlab up` (control plane + worker + a Debian container), as a student
// would use it. Screenshots of every page go to target/screenshots/ (not committed).
//
// Skips with a reason when it cannot run (not root, no binary, no chromium, no stock image),
// unless IRONLAB_E2E_REQUIRED=1 (scripts/test.sh), where that is a failure.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM, Platform, repoRoot, unmetPreconditions } from './platform.mjs';

const SCREENSHOTS = process.env.IRONLAB_SCREENSHOTS ?? path.join(repoRoot, 'target', 'screenshots');
const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-background-networking',
  '--disable-gpu',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
];
/** First start of a run builds the image's drive: allow for it. */
const RUN_READY_MS = 240_000;

async function shot(page, name) {
  fs.mkdirSync(SCREENSHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SCREENSHOTS, `${name}.png`), fullPage: true });
}

/** Lines of terminal `i` (xterm.js buffer: scrollback + screen). */
function termLines(page, i = 0) {
  return page.evaluate((i) => window.ironlab?.terminals?.[i]?.lines() ?? [], i);
}

/** Waits until a line of terminal `i` matches `re`; returns the last match. */
async function waitForLine(page, re, i = 0, timeout = 20_000) {
  const deadline = Date.now() + timeout;
  let lines = [];
  while (Date.now() < deadline) {
    lines = await termLines(page, i);
    const hits = lines.map((l) => l.trim().match(re)).filter(Boolean);
    if (hits.length) return hits[hits.length - 1];
    await page.waitForTimeout(100);
  }
  throw new Error(`no terminal line matched ${re} within ${timeout} ms; screen:\n${lines.filter((l) => l.trim()).slice(-20).join('\n')}`);
}

/** Types a command into the focused terminal. */
async function type(page, text) {
  await page.keyboard.type(text, { delay: 5 });
  await page.keyboard.press('Enter');
}

async function noHorizontalScroll(page) {
  return page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth);
}

test('web UI in a real browser: sign in, start, terminal, reconnect, dashboard', { timeout: 900_000 }, async (t) => {
  const unmet = unmetPreconditions();
  if (unmet) {
    if (process.env.IRONLAB_E2E_REQUIRED === '1') assert.fail(`cannot run: ${unmet} (IRONLAB_E2E_REQUIRED=1)`);
    t.skip(unmet);
    return;
  }
  const p = await Platform.start();
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  let runId = null;
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const page = await context.newPage();
    const consoleErrors = [];
    page.on('pageerror', (e) => consoleErrors.push(String(e)));

    await t.test('unauthenticated pages go to the sign-in page', async () => {
      await page.goto(`${p.base}/dashboard`);
      assert.equal(new URL(page.url()).pathname, '/login');
      await shot(page, '01-login');
    });

    await t.test('the admin link signs in and lands on the catalog', async () => {
      assert.match(p.link, /^http:\/\/127\.0\.0\.1:\d+\/login\/admin\?key=\S+$/);
      await page.goto(p.link);
      assert.equal(page.url(), `${p.base}/`);
      const card = page.locator('li[data-playground="debian"]');
      assert.equal(await card.locator('h2').textContent(), 'Debian 12');
      assert.match(await card.locator('.description').textContent(), /Debian 12/);
      assert.equal(await card.locator('.chip').first().textContent(), 'debian');
      const [cookie] = (await context.cookies()).filter((c) => c.name === 'ironlab_session');
      assert.ok(cookie, 'the session cookie is set');
      assert.equal(cookie.httpOnly, true);
      assert.equal(cookie.sameSite, 'Lax');
      await shot(page, '02-catalog');
    });

    await t.test('start debian from the catalog; the state updates without a reload', async () => {
      await page.locator('li[data-playground="debian"] button[type=submit]').click();
      await page.waitForURL(/\/runs\/[a-z0-9]{12}$/);
      runId = page.url().split('/').pop();
      p.track(runId);
      await page.evaluate(() => {
        window.__sameDocument = true;
      });
      await shot(page, '03-run-starting');
      await page.waitForFunction(() => document.getElementById('run-state')?.textContent === 'running', null, {
        timeout: RUN_READY_MS,
      });
      assert.equal(await page.evaluate(() => window.__sameDocument), true, 'no page reload');
      assert.equal(await page.locator('#run-progress').isHidden(), true);
      await page.waitForFunction(() => window.ironlab?.terminals?.[0]?.phase === 'open', null, { timeout: 30_000 });
      const tabs = await page.locator('[role=tab]:not(.add)').allTextContents();
      assert.deepEqual(tabs, ['debian'], 'one terminal tab per manifest tab');
    });

    await t.test('keyboard focus is in the terminal; echo $((6*7)) prints 42', async () => {
      const focused = await page.evaluate(() => document.activeElement?.classList.contains('xterm-helper-textarea'));
      assert.equal(focused, true, 'the terminal has keyboard focus');
      await type(page, 'echo $((6*7))');
      await waitForLine(page, /^42$/);
      await shot(page, '04-run-terminal');
    });

    await t.test('resizing the window changes stty size', async () => {
      await type(page, 'echo S:$(stty size)');
      const [, rows1, cols1] = await waitForLine(page, /^S:(\d+) (\d+)$/);
      await page.setViewportSize({ width: 860, height: 560 });
      let rows2 = rows1;
      let cols2 = cols1;
      const deadline = Date.now() + 15_000;
      while (rows2 === rows1 && cols2 === cols1 && Date.now() < deadline) {
        await page.waitForTimeout(300);
        await page.locator('.xterm-helper-textarea').first().focus();
        await type(page, 'echo T:$(stty size)');
        [, rows2, cols2] = await waitForLine(page, /^T:(\d+) (\d+)$/);
      }
      assert.ok(Number(cols2) < Number(cols1), `columns shrank: ${cols1} → ${cols2}`);
      assert.ok(Number(rows2) < Number(rows1), `rows shrank: ${rows1} → ${rows2}`);
      const term = await page.evaluate(() => [window.ironlab.terminals[0].term.rows, window.ironlab.terminals[0].term.cols]);
      assert.deepEqual(term.map(String), [rows2, cols2], 'the shell sees the size xterm.js shows');
      await page.setViewportSize({ width: 1280, height: 800 });
    });

    await t.test('a dropped WebSocket reconnects to the same shell', async () => {
      await page.locator('.xterm-helper-textarea').first().focus();
      await type(page, 'echo A:$$');
      const [, before] = await waitForLine(page, /^A:(\d+)$/);
      const starts = await page.evaluate(() => window.ironlab.terminals[0].starts);
      await page.evaluate(() => window.ironlab.terminals[0].socket.close());
      await page.waitForFunction(
        (n) => window.ironlab.terminals[0].starts > n && window.ironlab.terminals[0].phase === 'open',
        starts,
        { timeout: 20_000 },
      );
      await page.locator('.xterm-helper-textarea').first().focus();
      await type(page, 'echo B:$$');
      const [, after] = await waitForLine(page, /^B:(\d+)$/);
      assert.equal(after, before, 'the same shell ($$) is back after the reconnect');
      // Recent output was replayed into the fresh screen.
      const lines = await termLines(page);
      assert.ok(lines.some((l) => l.trim() === `A:${before}`), 'output from before the drop is replayed');
    });

    await t.test('"+" opens another shell on the same machine', async () => {
      await page.locator('#add-tab').click();
      await page.waitForFunction(() => window.ironlab.terminals.length === 2 && window.ironlab.terminals[1].phase === 'open', null, {
        timeout: 20_000,
      });
      await type(page, 'echo C:$$');
      const [, other] = await waitForLine(page, /^C:(\d+)$/, 1);
      const [, first] = await waitForLine(page, /^A:(\d+)$/, 0);
      assert.notEqual(other, first, 'a different shell');
      await shot(page, '05-run-second-tab');
    });

    await t.test('a flood of output (yes) keeps the page responsive and memory bounded', async () => {
      await page.locator('[role=tab]').first().click();
      await type(page, 'timeout 5 yes ironlab-flood-line');
      await page.waitForTimeout(5500);
      await type(page, 'echo F:$((6*7))');
      await waitForLine(page, /^F:42$/, 0, 60_000);
      const { heap, scrollback } = await page.evaluate(() => ({
        heap: performance.memory?.usedJSHeapSize ?? 0,
        scrollback: window.ironlab.terminals[0].term.buffer.active.length,
      }));
      assert.ok(scrollback <= 5000 + 200, `scrollback is capped (${scrollback} lines)`);
      assert.ok(heap < 200 * 1024 * 1024, `JS heap stays small after the flood (${Math.round(heap / 1048576)} MiB)`);
    });

    await t.test('an HTTP port of the machine opens on its own *.localhost host, for the owner only', async () => {
      // A one-line HTTP server (perl is in every Debian) on the machine's loopback.
      await type(
        page,
        `perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalAddr=>"127.0.0.1:8000",Listen=>5,ReuseAddr=>1) or die;` +
          `while($c=$s->accept){while(<$c>){last if /^\\r?$/}print $c "HTTP/1.0 200 OK\\r\\nContent-Type: text/html\\r\\n\\r\\n` +
          `<title>inside</title><h1 id=hello>served from the machine</h1>";close $c}' >/dev/null 2>&1 &`,
      );
      const site = await context.newPage();
      let status = 0;
      for (let i = 0; i < 50 && status !== 200; i++) {
        // What an http-port tab links to: a fresh sign-in link, then the port's own host.
        status = (await site.goto(`${p.base}/runs/${runId}/ports/debian/8000`)).status();
        if (status !== 200) await site.waitForTimeout(200);
      }
      assert.equal(status, 200, `the port answered: ${await site.content()}`);
      const url = new URL(site.url());
      assert.equal(url.host, `${runId}-8000-debian.localhost:${p.port}`);
      assert.equal(url.pathname, '/', 'served at the root of its host');
      assert.equal(await site.locator('#hello').textContent(), 'served from the machine');
      const cookies = await context.cookies(url.origin);
      assert.deepEqual(
        cookies.map((c) => c.name),
        ['ironlab_port'],
        'the port host gets its own cookie and never the session cookie',
      );
      await shot(site, '12-http-port');
      await site.close();

      // A browser without the owner's session gets nothing, on either host.
      const stranger = await browser.newContext();
      const sp = await stranger.newPage();
      const direct = await sp.goto(url.href);
      assert.equal(direct.status(), 401);
      assert.match(await sp.locator('h1').textContent(), /Sign in through the run page/);
      await sp.goto(`${p.base}/runs/${runId}/ports/debian/8000`);
      assert.equal(new URL(sp.url()).pathname, '/login');
      await stranger.close();
    });

    await t.test('CSRF: state-changing requests without the token are refused (403)', async () => {
      const apiStatus = await page.evaluate(async () => {
        const r = await fetch('/api/v1/runs', {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ playground: 'debian' }),
        });
        return r.status;
      });
      assert.equal(apiStatus, 403);
      const form = await page.request.post(`${p.base}/runs`, {
        form: { playground: 'debian' },
        headers: { Origin: p.base },
        maxRedirects: 0,
      });
      assert.equal(form.status(), 403);
      const forged = await page.request.post(`${p.base}/runs/${runId}/destroy`, {
        form: { csrf: 'not-the-token' },
        headers: { Origin: p.base },
        maxRedirects: 0,
      });
      assert.equal(forged.status(), 403);
      const { json: runs } = await p.api('GET', '/runs');
      assert.equal(runs.length, 1, 'nothing was started by the refused requests');
      assert.equal(runs[0].state, 'running', 'and nothing was destroyed');
    });

    await t.test('a 390 px phone screen shows catalog, run and dashboard without horizontal scroll', async () => {
      const phone = await browser.newContext({
        viewport: { width: 390, height: 844 },
        deviceScaleFactor: 2,
        isMobile: true,
        hasTouch: true,
        storageState: await context.storageState(),
      });
      const mobile = await phone.newPage();
      for (const [name, url] of [
        ['06-phone-catalog', '/'],
        ['07-phone-run', `/runs/${runId}`],
        ['08-phone-dashboard', '/dashboard'],
      ]) {
        await mobile.goto(`${p.base}${url}`);
        if (url.startsWith('/runs/')) {
          await mobile.waitForFunction(() => window.ironlab?.terminals?.[0]?.phase === 'open', null, { timeout: 30_000 });
        }
        assert.equal(await noHorizontalScroll(mobile), true, `${url} scrolls sideways at 390 px`);
        await shot(mobile, name);
      }
      await phone.close();
    });

    await t.test('admin creates a local account; it signs in with its password', async () => {
      await page.goto(`${p.base}/admin/users`);
      await page.fill('#create-user input[name=name]', 'student');
      await page.fill('#create-user input[name=password]', 'correct horse battery');
      await page.click('#create-user button[type=submit]');
      await page.waitForSelector('text=Created student');
      await shot(page, '09-admin-users');
      const other = await browser.newContext({ viewport: { width: 1280, height: 800 } });
      const sp = await other.newPage();
      await sp.goto(`${p.base}/login`);
      await sp.fill('input[name=name]', 'student');
      await sp.fill('input[name=password]', 'wrong password');
      await sp.click('button[type=submit]');
      assert.match(await sp.locator('.error').textContent(), /wrong user name or password/);
      await sp.fill('input[name=password]', 'correct horse battery');
      await sp.click('button[type=submit]');
      await sp.waitForURL(`${p.base}/`);
      assert.equal(await sp.locator('.who').textContent(), 'student');
      await other.close();
    });

    await t.test('stop from the run page, clone and restart from the dashboard; files survive', async () => {
      await page.goto(`${p.base}/runs/${runId}`);
      await page.waitForFunction(() => window.ironlab?.terminals?.[0]?.phase === 'open', null, { timeout: 30_000 });
      await page.locator('.xterm-helper-textarea').first().focus();
      await type(page, 'echo persisted > ~/kept.txt; echo saved-$((20+1))');
      await waitForLine(page, /^saved-21$/);
      await page.locator('#stop-form button').click();
      await page.waitForURL(`${p.base}/runs/${runId}`);
      await page.waitForFunction(() => document.getElementById('run-state')?.textContent === 'stopped', null, {
        timeout: 60_000,
      });
      assert.equal(await page.locator('#run-stopped').isVisible(), true, 'the stopped notice shows');
      assert.equal(await page.locator('#terminals').isHidden(), true);
      await shot(page, '12-run-stopped');

      await page.goto(`${p.base}/dashboard`);
      const first = page.locator('#runs tbody tr').first();
      assert.equal(await first.getAttribute('data-run-id'), runId, 'stopped runs come first');
      assert.match(await page.locator('#storage').textContent(), /of 10\.0 GiB/);
      await first.locator('form.clone button').click();
      await page.waitForURL(`${p.base}/dashboard`);
      const { json: runs } = await p.api('GET', '/runs');
      const clone = runs.find((r) => r.cloned_from === runId);
      assert.ok(clone, 'the clone is listed');
      p.track(clone.id);
      assert.equal(clone.state, 'stopped');
      await shot(page, '13-dashboard-stopped-and-clone');
      assert.equal(await noHorizontalScroll(page), true);

      await page.locator(`tr[data-run-id="${runId}"] form.restart button`).click();
      await page.waitForURL(`${p.base}/runs/${runId}`);
      await page.waitForFunction(() => document.getElementById('run-state')?.textContent === 'running', null, {
        timeout: RUN_READY_MS,
      });
      await page.waitForFunction(() => window.ironlab?.terminals?.[0]?.phase === 'open', null, { timeout: 30_000 });
      await page.locator('.xterm-helper-textarea').first().focus();
      await type(page, 'cat ~/kept.txt');
      await waitForLine(page, /^persisted$/);
      await p.api('DELETE', `/runs/${clone.id}`);
    });

    await t.test('dashboard: rename in place, then destroy', async () => {
      await page.goto(`${p.base}/dashboard`);
      const row = page.locator(`tr[data-run-id="${runId}"]`);
      assert.equal(await row.locator('.state').textContent(), 'running');
      assert.match(await row.locator('td.left').textContent(), /^1 h 5\d min$|^2 h$/);
      await shot(page, '10-dashboard');
      const input = row.locator('input[name=title]');
      await input.fill('My web test');
      const patched = page.waitForResponse((r) => r.request().method() === 'PATCH' && r.url().endsWith(`/api/v1/runs/${runId}`));
      await input.press('Enter');
      assert.equal((await patched).status(), 200);
      const { json: view } = await p.api('GET', `/runs/${runId}`);
      assert.equal(view.title, 'My web test');
      await row.locator('form.destroy button').click();
      await page.waitForFunction(
        (id) => document.querySelector(`tr[data-run-id="${id}"] .state`)?.textContent === 'destroyed',
        runId,
        { timeout: 60_000 },
      );
      await shot(page, '11-dashboard-destroyed');
      await page.reload();
      assert.equal(await row.locator('.state').textContent(), 'destroyed');
      assert.equal(await row.locator('input[name=title]').inputValue(), 'My web test');
    });

    assert.deepEqual(consoleErrors, [], 'no script errors on the pages');
  } finally {
    await browser.close();
    await p.stop();
  }
});
