// Real-browser test of the run page's checklist: Debian's chromium (playwright-core) against a
// real `ironlab up` with a small Debian challenge. The checklist ticks as the student types in
// the terminal, the next task's hint appears, an input task refuses a wrong answer and accepts
// the right one, a failcheck shows "you broke it" with a Restart button that starts a fresh run,
// and the page has no horizontal scroll at 390 px.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM, Platform, repoRoot, unmetPreconditions } from './platform.mjs';

const SCREENSHOTS = process.env.IRONLAB_SCREENSHOTS ?? path.join(repoRoot, 'target', 'screenshots');
const CHROMIUM_ARGS = ['--no-sandbox', '--disable-background-networking', '--disable-gpu', '--disable-component-update', '--disable-sync', '--no-first-run'];
const RUN_READY_MS = 240_000;

const MANIFEST = {
  kind: 'playground',
  name: 'web-tasks',
  title: 'Checklist lab',
  playground: {
    machines: [{ name: 'box', resources: { memory: '256MiB' }, drives: [{ source: 'debian', mount: '/', size: '2GiB' }] }],
    tasks: {
      setup: { init: true, run: 'mkdir -p /opt/lab' },
      made_file: { run: 'test -f /tmp/ready', hintcheck: 'echo "create /tmp/ready"', interval: '300ms' },
      second: { needs: ['made_file'], run: 'test -f /tmp/second', hintcheck: 'echo "now create /tmp/second"', interval: '300ms' },
      answer: { input: true, run: 'test "$INPUT" = 42', hintcheck: 'echo "six times seven"' },
      keep_safe: {
        run: 'false',
        failcheck: 'if [ -f /tmp/broken ]; then echo "/tmp/broken must never exist"; exit 1; fi',
        interval: '300ms',
      },
    },
  },
};

async function shot(page, name) {
  fs.mkdirSync(SCREENSHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SCREENSHOTS, `${name}.png`), fullPage: true });
}

const row = (page, name) => page.locator(`li.task[data-task="${name}"]`);

async function waitTask(page, name, state, timeout = 30_000) {
  await page.waitForFunction(
    ([n, s]) => document.querySelector(`li.task[data-task="${n}"]`)?.dataset.state === s,
    [name, state],
    { timeout },
  );
}

async function type(page, text) {
  await page.locator('.xterm-helper-textarea').first().focus();
  await page.keyboard.type(text, { delay: 5 });
  await page.keyboard.press('Enter');
}

test('run page checklist: ticks, hints, input answers, you broke it + Restart, 390 px', { timeout: 900_000 }, async (t) => {
  const unmet = unmetPreconditions();
  if (unmet) {
    if (process.env.IRONLAB_E2E_REQUIRED === '1') assert.fail(`cannot run: ${unmet} (IRONLAB_E2E_REQUIRED=1)`);
    t.skip(unmet);
    return;
  }
  const p = await Platform.start();
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  try {
    const created = await p.api('POST', '/playgrounds', MANIFEST);
    assert.equal(created.status, 201, JSON.stringify(created.json));
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const page = await context.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    await page.goto(p.link);
    await page.locator('li[data-playground="web-tasks"] button[type=submit]').click();
    await page.waitForURL(/\/runs\/[a-z0-9]{12}$/);
    const runId = page.url().split('/').pop();
    p.track(runId);

    await t.test('the checklist is rendered with the page, then set up live', async () => {
      const names = await page.locator('li.task').evaluateAll((ls) => ls.map((l) => l.dataset.task));
      assert.deepEqual(names, ['setup', 'answer', 'keep_safe', 'made_file', 'second']);
      await page.waitForFunction(() => document.getElementById('run-state')?.textContent === 'running', null, { timeout: RUN_READY_MS });
      await waitTask(page, 'setup', 'completed');
      await page.waitForFunction(() => document.getElementById('tasks-setup')?.hidden === true);
      await page.waitForFunction(() => window.ironlab?.terminals?.[0]?.phase === 'open', null, { timeout: 30_000 });
      await waitTask(page, 'made_file', 'running');
      await page.waitForFunction(() => document.querySelector('li.task[data-task="made_file"] .task-hint')?.textContent === 'create /tmp/ready');
      assert.equal(await row(page, 'second').getAttribute('data-state'), 'blocked');
      assert.equal(await page.locator('#tasks-count').textContent(), '1/5');
      await shot(page, 'tasks-01-checklist');
    });

    await t.test('typing the solution ticks tasks and shows the next hint', async () => {
      await type(page, 'touch /tmp/ready');
      await waitTask(page, 'made_file', 'completed');
      assert.equal(await row(page, 'made_file').locator('.task-hint').isHidden(), true, 'a completed task has no hint');
      await waitTask(page, 'second', 'running');
      await page.waitForFunction(() => document.querySelector('li.task[data-task="second"] .task-hint')?.textContent === 'now create /tmp/second');
      await type(page, 'touch /tmp/second');
      await waitTask(page, 'second', 'completed');
      assert.equal(await page.locator('#tasks-count').textContent(), '3/5');
      await shot(page, 'tasks-02-ticked');
    });

    await t.test('an input task refuses a wrong answer and accepts the right one', async () => {
      const answer = row(page, 'answer');
      await answer.locator('input[name=value]').fill('41');
      await answer.locator('button[type=submit]').click();
      await page.waitForFunction(() => document.querySelector('li.task[data-task="answer"] .task-result')?.classList.contains('refused'));
      assert.equal(await answer.locator('.task-result').textContent(), 'Not accepted: six times seven');
      assert.equal(await answer.getAttribute('data-state'), 'running');
      await answer.locator('input[name=value]').fill('42');
      await answer.locator('button[type=submit]').click();
      await page.waitForFunction(() => document.querySelector('li.task[data-task="answer"] .task-result')?.classList.contains('accepted'));
      assert.equal(await answer.locator('.task-result').textContent(), 'Accepted.');
      await waitTask(page, 'answer', 'completed');
      assert.equal(await answer.locator('form.task-input').isHidden(), true);
      await shot(page, 'tasks-03-input');
    });

    await t.test('a reload shows the same checklist, rendered by the server', async () => {
      await page.reload();
      for (const n of ['setup', 'made_file', 'second', 'answer']) {
        assert.equal(await row(page, n).getAttribute('data-state'), 'completed', n);
      }
      assert.equal(await page.locator('#tasks-count').textContent(), '4/5');
    });

    await t.test('a 390 px phone shows the checklist without horizontal scroll', async () => {
      const phone = await browser.newContext({
        viewport: { width: 390, height: 844 },
        deviceScaleFactor: 2,
        isMobile: true,
        hasTouch: true,
        storageState: await context.storageState(),
      });
      const mobile = await phone.newPage();
      await mobile.goto(`${p.base}/runs/${runId}`);
      await mobile.waitForSelector('li.task[data-task="answer"]');
      assert.equal(await mobile.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth), true, 'no sideways scroll at 390 px');
      const box = await mobile.locator('#tasks').boundingBox();
      assert.ok(box && box.width <= 390, `the checklist fits: ${JSON.stringify(box)}`);
      await shot(mobile, 'tasks-04-phone');
      await phone.close();
    });

    await t.test('breaking the machine shows "you broke it"; Restart starts a fresh run', async () => {
      await page.waitForFunction(() => window.ironlab?.terminals?.[0]?.phase === 'open', null, { timeout: 30_000 });
      await type(page, 'touch /tmp/broken');
      await waitTask(page, 'keep_safe', 'failed');
      assert.equal(await page.locator('#tasks-broken').isVisible(), true);
      assert.equal(await row(page, 'keep_safe').locator('.task-hint').textContent(), '/tmp/broken must never exist');
      await shot(page, 'tasks-05-broken');
      await page.locator('#restart-form button[type=submit]').click();
      await page.waitForURL((u) => /\/runs\/[a-z0-9]{12}$/.test(u.pathname) && !u.pathname.endsWith(runId));
      const fresh = page.url().split('/').pop();
      p.track(fresh);
      const { json: old } = await p.api('GET', `/runs/${runId}`);
      assert.ok(['destroying', 'destroyed'].includes(old.state), `the broken run is destroyed: ${old.state}`);
      const { json: list } = await p.api('GET', `/runs/${fresh}/tasks`);
      assert.equal(list.tasks.find((x) => x.name === 'keep_safe').state === 'failed', false, 'a fresh checklist');
      assert.equal(await page.locator('#tasks-broken').isHidden(), true);
    });
    assert.deepEqual(errors, [], 'no script errors');
  } catch (e) {
    console.error(p.logTail());
    throw e;
  } finally {
    await browser.close();
    await p.stop();
  }
});
