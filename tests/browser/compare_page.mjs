// The comparison page in a real browser: headless Chromium driven by playwright-core against
// `ggpt-serve` with the four formats of the bundled model (and a compare report).
//
//   GGPT_BIN=target/release/ggpt GGPT_SERVE=target/release/ggpt-serve \
//   GGPT_MODELS=<dir with tiny-gpt2-{F16,Q8_0,Q6_K,Q4_K_M}.gguf and report.json> \
//   GGPT_ARTIFACTS=target/browser node tests/browser/compare_page.mjs
//
// Checks: the page loads with no console errors and shows the report panel with both charts;
// submitting a prompt fills one column per format; the flips `ggpt diff --json` finds for the
// same prompt are exactly the positions the page outlines; the hover card shows a top-5 for
// every format; arrow keys move the focus and the card; a prompt beyond the context gets the
// server's message on the page. Screenshots (laptop and phone width) go to GGPT_ARTIFACTS.
import { chromium } from 'playwright-core';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import assert from 'node:assert/strict';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const BIN = resolve(env('GGPT_BIN'));
const SERVE = resolve(env('GGPT_SERVE'));
const MODELS = resolve(env('GGPT_MODELS'));
const OUT = resolve(process.env.GGPT_ARTIFACTS || 'target/browser');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const FORMATS = ['F16', 'Q8_0', 'Q6_K', 'Q4_K_M'];
const files = FORMATS.map((f) => join(MODELS, `tiny-gpt2-${f}.gguf`));
const PROMPT = 'In the beginning';
const N = 32;

mkdirSync(OUT, { recursive: true });

// The flips the CLI finds (greedy, so the page's greedy columns follow the same base tokens).
const cli = JSON.parse(execFileSync(BIN, ['diff', ...files.flatMap((f) => ['-m', f]), '-p', PROMPT, '-n', String(N), '--json']));
const expected = Object.fromEntries(cli.models.map((m, mi) => [m, cli.tokens.flatMap((t, i) => (t.models[mi].flip ? [i] : []))]));
assert.ok(expected['tiny-gpt2-Q4_K_M'].length > 0, `no Q4_K_M flip for ${JSON.stringify(PROMPT)}: pick another prompt`);

// Start the server on a free port; it prints the address it listens on.
const server = spawn(SERVE, [...files.flatMap((f) => ['-m', f]), '--port', '0', '--parallel', '2', '-t', '2', '--report', join(MODELS, 'report.json')], { stdio: ['ignore', 'ignore', 'pipe'] });
let serverLog = '';
const base = await new Promise((res, rej) => {
  const t = setTimeout(() => rej(new Error('the server did not start in 60 s:\n' + serverLog)), 60000);
  server.stderr.on('data', (d) => {
    serverLog += d;
    const m = /listening on (http:\/\/\S+)/.exec(serverLog);
    if (m) { clearTimeout(t); res(m[1]); }
  });
  server.on('exit', (c) => rej(new Error(`the server exited (${c}):\n${serverLog}`)));
});
for (let i = 0; ; i++) {
  const r = await fetch(base + '/health').catch(() => null);
  if (r && r.ok) break;
  if (i > 600) throw new Error('the server never became healthy:\n' + serverLog);
  await new Promise((r) => setTimeout(r, 100));
}

const profile = mkdtempSync(join(tmpdir(), 'ggpt-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: CHROMIUM,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  viewport: { width: 1366, height: 900 },
});
const errors = [];
let failed = false;
try {
  const page = context.pages()[0] || (await context.newPage());
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
  page.on('pageerror', (e) => errors.push(String(e)));
  // Nothing may leave the machine: every request goes to the server under test.
  page.on('request', (r) => { if (!r.url().startsWith(base) && !r.url().startsWith('blob:')) errors.push('external request ' + r.url()); });

  await page.goto(base + '/');
  await page.waitForSelector('body[data-loaded="true"]', { timeout: 20000 });
  assert.equal(await page.isVisible('#error'), false, 'error on load: ' + (await page.textContent('#error')));
  assert.deepEqual(await page.$$eval('#base option', (o) => o.map((x) => x.value)), cli.models);
  assert.equal(await page.inputValue('#base'), 'tiny-gpt2-F16');
  // The report panel: a row per format and both charts.
  await page.waitForSelector('#report:not([hidden]) #charts img:nth-child(2)');
  const reported = JSON.parse(readFileSync(join(MODELS, 'report.json'), 'utf8')).formats.length;
  assert.equal(await page.$$eval('#report-table tbody tr', (r) => r.length), reported);
  await page.waitForFunction(() => [...document.querySelectorAll('#charts img')].every((i) => i.complete && i.naturalWidth > 0));

  await page.fill('#prompt', PROMPT);
  await page.fill('#max_tokens', String(N));
  await page.fill('#temperature', '0');
  await page.click('#go');
  await page.waitForSelector('body[data-ready]', { timeout: 60000 });
  assert.equal(await page.getAttribute('body', 'data-ready'), 'true', 'compare failed: ' + (await page.textContent('#error')));
  assert.equal(await page.isVisible('#error'), false, await page.textContent('#error'));
  assert.deepEqual(errors, [], 'console errors');

  // Four columns, each filled.
  const cols = await page.$$eval('.col', (cs) => cs.map((c) => ({ name: c.getAttribute('aria-label'), n: c.querySelectorAll('.tok').length, flips: [...c.querySelectorAll('.tok.flip')].map((t) => Number(t.dataset.i)) })));
  assert.equal(cols.length, 4);
  for (const c of cols) {
    assert.equal(c.n, cli.tokens.length, `${c.name}: ${c.n} tokens`);
    // Outlined exactly where the CLI's diff flips.
    assert.deepEqual(c.flips, expected[c.name], `${c.name} flips`);
  }
  // The base column streamed the same greedy tokens the CLI's base chose.
  const baseText = await page.$$eval('.col:first-child .tok', (t) => t.map((x) => x.textContent));
  assert.deepEqual(baseText, cli.tokens.map((t) => t.text));

  // Hover the first Q4_K_M flip: every format's top-5 and KLD.
  const k = expected['tiny-gpt2-Q4_K_M'][0];
  const flipTok = `.col[aria-label="tiny-gpt2-Q4_K_M"] .tok[data-i="${k}"]`;
  assert.ok(await page.$eval(flipTok, (e) => e.classList.contains('flip')));
  await page.hover(flipTok);
  await page.waitForSelector('#card:not([hidden])');
  const cardInfo = await page.$$eval('#card .fmt', (fs) => fs.map((f) => ({ name: f.querySelector('strong').textContent, top: f.querySelectorAll('li').length, text: f.textContent })));
  assert.deepEqual(cardInfo.map((c) => c.name), cli.models);
  for (const c of cardInfo) {
    assert.equal(c.top, 5, c.name);
    assert.match(c.text, /KLD/);
  }
  assert.match(await page.textContent('#card h3'), new RegExp(`token ${k}`));
  await page.screenshot({ path: join(OUT, 'compare-page.png'), fullPage: true });

  // Keyboard: focus the base column's first token, move right, the card follows.
  await page.mouse.move(0, 0);
  await page.focus('.col:first-child .tok[data-i="0"]');
  await page.keyboard.press('ArrowRight');
  assert.equal(await page.evaluate(() => document.activeElement.dataset.i), '1');
  assert.match(await page.textContent('#card h3'), /token 1\b/);
  await page.keyboard.press('Escape');
  assert.equal(await page.isVisible('#card'), false);

  // Phone width: columns stack, nothing wider than the screen.
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `page ${overflow}px wider than a phone screen`);
  await page.screenshot({ path: join(OUT, 'compare-page-phone.png'), fullPage: false });
  await page.setViewportSize({ width: 1366, height: 900 });

  // A prompt beyond the context: the server's 400 is shown to the user.
  await page.fill('#prompt', 'word '.repeat(1100));
  await page.click('#go');
  await page.waitForSelector('#error:not([hidden])', { timeout: 30000 });
  const msg = await page.textContent('#error');
  assert.match(msg, /400/, msg);
  assert.match(msg, /context|exceeds|1024/i, msg);
  await page.screenshot({ path: join(OUT, 'compare-page-error.png') });
  console.log(`browser test: ok (${cols.length} columns, Q4_K_M flips at ${expected['tiny-gpt2-Q4_K_M'].join(', ')}; screenshots in ${OUT})`);
} catch (e) {
  failed = true;
  console.error(e);
  console.error('console errors:', errors);
  try { await context.pages()[0].screenshot({ path: join(OUT, 'compare-page-failure.png'), fullPage: true }); } catch (_) { /* best effort */ }
} finally {
  await context.close();
  server.kill('SIGTERM');
  rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
