// The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core), against a running daemon: TASKD_ADDR (host:port), TASKD_TOKEN, and
// TASKD_HOSTS (two agents' names, comma-separated) for the dispatch grid.
//
//   node tests/browser/dashboard.mjs            the checks (run by tests/it/dashboard.rs)
//   SCREENSHOTS=docs node …                     also writes the main views' screenshots
//   BENCH=1 node …                              only the measurements (scripts/bench-dashboard)
//
// Each check waits for what a user would see, with a deadline; nothing sleeps and hopes.

import { chromium } from 'playwright-core';
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import os from 'node:os';

const addr = process.env.TASKD_ADDR;
const token = process.env.TASKD_TOKEN;
const hosts = (process.env.TASKD_HOSTS || '').split(',').filter(Boolean);
const shots = process.env.SCREENSHOTS;
const bench = !!process.env.BENCH;
const base = `http://${addr}`;
const WAIT = 15000;

if (!addr || !token) {
  console.error('TASKD_ADDR and TASKD_TOKEN are required');
  process.exit(2);
}

let nextId = 1;
/** A JSON-RPC call over HTTP with the token, as any client makes it. */
async function call(method, ...params) {
  const r = await fetch(base, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${token}` },
    body: JSON.stringify({ jsonrpc: '2.0', id: nextId++, method, params }),
  });
  const v = await r.json();
  if (v.error) throw new Error(`${method}: ${v.error.message}`);
  return v.result;
}

async function until(what, fn, ms = WAIT) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

function check(cond, msg) {
  if (!cond) throw new Error(`check failed: ${msg}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
const page = await context.newPage();
const errors = [];
page.on('pageerror', (e) => errors.push(String(e)));
page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
if (process.env.DEBUG) {
  page.on('websocket', (ws) => {
    ws.on('framesent', (f) => console.log('sent', String(f.payload).slice(0, 300)));
    ws.on('framereceived', (f) => console.log('recv', String(f.payload).slice(0, 300)));
  });
}

async function signIn() {
  await page.goto(`${base}/`);
  await page.waitForSelector('#token');
  await page.fill('#token', token);
  await page.click('button[type=submit]');
  await page.waitForSelector('#conn.live', { timeout: WAIT });
}

async function shot(name, p = page) {
  if (!shots) return;
  fs.mkdirSync(shots, { recursive: true });
  await p.screenshot({ path: path.join(shots, `dashboard-${name}.png`) });
}

const results = [];
async function step(name, fn) {
  const t = Date.now();
  try {
    await fn();
    results.push(`ok   ${name} (${Date.now() - t} ms)`);
  } catch (e) {
    results.push(`FAIL ${name}: ${e.message}`);
    await page.screenshot({ path: path.join(os.tmpdir(), `taskd-dashboard-${name.replace(/\W+/g, '-')}.png`) }).catch(() => {});
    throw e;
  }
}

async function checks() {
  await step('a wrong token is refused, the right one signs in', async () => {
    await page.goto(`${base}/`);
    await page.waitForSelector('#token');
    await page.fill('#token', 'not-the-token');
    await page.click('button[type=submit]');
    await page.waitForSelector('#login-err:not([hidden])');
    check((await page.textContent('#login-err')).includes('wrong token'), 'the refusal says why');
    await page.fill('#token', token);
    await page.click('button[type=submit]');
    await page.waitForSelector('#conn.live', { timeout: WAIT });
    // The cookie is the session's, and out of the page's reach.
    const cookies = await context.cookies(base);
    const c = cookies.find((x) => x.name === 'taskd_session');
    check(c && c.httpOnly && c.sameSite === 'Strict', `an HttpOnly, SameSite=Strict cookie: ${JSON.stringify(cookies)}`);
    check((await page.evaluate(() => document.cookie)) === '', 'document.cookie does not show it');
  });
  // The refused sign-in's 401 is the only error the page may have logged.
  errors.length = 0;

  await call('TaskUnit.Add', { name: 'nightly-backup', command: ['true'], cron: '0 3 * * *', description: 'Back the database up' });
  await step('units are listed with their state and schedule', async () => {
    await page.goto(`${base}/#/`);
    await page.waitForSelector('tr[data-name="nightly-backup"]');
    const row = await page.textContent('tr[data-name="nightly-backup"]');
    check(row.includes('waiting') && row.includes('Back the database up'), row);
  });

  await step('a unit added through the API appears without a reload', async () => {
    const marker = await page.evaluate(() => { window.__sameDocument = 1; return 1; });
    await call('TaskUnit.Add', { name: 'added-live', command: ['true'], every: '1h' });
    await page.waitForSelector('tr[data-name="added-live"]');
    check(await page.evaluate(() => window.__sameDocument) === marker, 'the page was not reloaded');
    await page.fill('#q', 'added');
    await until('the search to narrow the list', async () => (await page.$$('tr[data-name]')).length === 1);
    await page.fill('#q', '');
  });
  await shot('units');

  await step("a run's output follows live, stdout and stderr told apart", async () => {
    const gate = path.join(os.tmpdir(), `taskd-gate-${process.pid}`);
    fs.rmSync(gate, { force: true });
    await call('TaskUnit.Add', { name: 'talker', script: `#!/bin/sh\necho first line\necho to stderr >&2\nwhile [ ! -e ${gate} ]; do sleep 0.05; done\necho after the gate\n` });
    const u = await until('its run', async () => (await call('TaskUnit.Get', 'talker')).last_run);
    await page.goto(`${base}/#/run/${u.id}`);
    await page.waitForFunction(() => document.querySelector('#out')?.textContent.includes('first line'));
    await page.waitForFunction(() => [...document.querySelectorAll('#out .err')].some((s) => s.textContent.includes('to stderr')));
    check(!(await page.textContent('#out')).includes('after the gate'), 'the run is still waiting');
    fs.writeFileSync(gate, '');
    await page.waitForFunction(() => document.querySelector('#out').textContent.includes('after the gate'));
    await page.waitForSelector('#state .s-succeeded');
    fs.rmSync(gate, { force: true });
  });
  await shot('run');

  await step('a run is cancelled from the page', async () => {
    await call('TaskUnit.Add', { name: 'sleeper', command: ['sleep', '300'] });
    const u = await until('its run', async () => (await call('TaskUnit.Get', 'sleeper')).last_run);
    await page.goto(`${base}/#/run/${u.id}`);
    await page.click('#cancel');
    await page.waitForSelector('#state .s-cancelled');
    check((await call('Run.Get', u.id)).state === 'cancelled', 'the daemon recorded it');
  });

  await step("the unit's controls work and its history shows", async () => {
    await page.goto(`${base}/#/unit/nightly-backup`);
    await page.click('button[data-act=Pause]');
    await page.waitForSelector('h1 .s-paused');
    await page.click('button[data-act=Resume]');
    await page.waitForSelector('h1 .s-waiting');
    await page.click('button[data-act=Start]');
    await page.waitForFunction(() => document.querySelector('#history')?.textContent.includes('manual'));
  });
  await shot('unit');

  await step('a form shows the API\'s validation error at its field', async () => {
    await page.goto(`${base}/#/add`);
    await page.fill('#f-name', 'bad-every');
    await page.check('input[name=kind][value=every]');
    await page.fill('#f-every', 'soon');
    await page.fill('#f-command', 'true');
    await page.click('form button[type=submit]');
    await page.waitForSelector('#e-every:not([hidden])');
    const msg = await page.textContent('#e-every');
    check(msg.startsWith('every'), `the message names the field: ${msg}`);
    check(await page.getAttribute('#f-every', 'aria-invalid') === 'true', 'the field is marked');
    check(await page.evaluate(() => document.activeElement.id) === 'f-every', 'focus goes to it');
    await shot('form');
    // Fixed, it is added.
    await page.fill('#f-every', '1h');
    await page.click('form button[type=submit]');
    await page.waitForSelector('h1 .badge');
    check((await call('TaskUnit.Get', 'bad-every')).definition.every === '1h', 'added as given');
  });

  await step('an edit changes only what was changed in the form', async () => {
    await call('TaskUnit.Add', { name: 'edited', command: ['sh', '-c', 'echo  two  spaces'], every: '1h', env: { A: '1', B: '2' } });
    await page.goto(`${base}/#/edit/edited`);
    await page.waitForSelector('#f-description');
    await page.fill('#f-description', 'now described');
    await page.fill('#f-env', 'A=1');
    await page.click('form button[type=submit]');
    await page.waitForSelector('h1 .badge');
    const def = (await call('TaskUnit.Get', 'edited')).definition;
    check(def.description === 'now described', JSON.stringify(def));
    check(JSON.stringify(def.env) === '{"A":"1"}', `B removed: ${JSON.stringify(def.env)}`);
    check(JSON.stringify(def.command) === '["sh","-c","echo  two  spaces"]', `command untouched: ${JSON.stringify(def.command)}`);
  });

  if (hosts.length >= 2) {
    await step('a dispatch grid fills in as hosts finish', async () => {
      const gate = path.join(os.tmpdir(), `taskd-grid-gate-${process.pid}`);
      fs.rmSync(gate, { force: true });
      await call('TaskUnit.Add', { name: 'fleet-job', hosts, script: `#!/bin/sh\nwhile [ ! -e ${gate} ]; do sleep 0.05; done\n` });
      const d = await until('its dispatch', async () => (await call('Dispatch.List', { unit: 'fleet-job' }))[0]);
      await page.goto(`${base}/#/dispatch/${d.id}`);
      await page.waitForFunction((n) => document.querySelectorAll('.host.s-running').length === n, hosts.length);
      await shot('dispatch');
      fs.writeFileSync(gate, '');
      await page.waitForFunction((n) => document.querySelectorAll('.host.s-succeeded').length === n, hosts.length);
      await page.waitForSelector('h1 .s-succeeded');
      // A host's menu offers a redo, which the grid shows running again.
      await page.click(`.host[data-host="${hosts[0]}"]`);
      fs.rmSync(gate, { force: true });
      await page.click('button[data-r=Redo]');
      await page.waitForSelector(`.host.s-running[data-host="${hosts[0]}"]`);
      fs.writeFileSync(gate, '');
      await page.waitForSelector(`.host.s-succeeded[data-host="${hosts[0]}"]`);
      fs.rmSync(gate, { force: true });
    });
    await step('agents are listed', async () => {
      await page.goto(`${base}/#/agents`);
      await page.waitForFunction((h) => h.every((n) => document.querySelector('main').textContent.includes(n)), hosts);
    });
    await shot('agents');
  }

  await step('the event stream and the status show', async () => {
    await page.goto(`${base}/#/events`);
    await call('TaskUnit.Start', 'nightly-backup');
    await page.waitForFunction(() => document.querySelector('#ev')?.textContent.includes('run.finished'));
    await shot('events');
    await page.goto(`${base}/#/status`);
    await page.waitForFunction(() => document.querySelector('main').textContent.includes('Version'));
    await shot('status');
  });

  await step('a WebSocket from another origin is refused, even with the cookie', async () => {
    // Without the key, the daemon's own page is refused too: the cookie alone opens nothing.
    const before = errors.length;
    check(before === 0, `no errors before: ${errors.join(' | ')}`);
    const bare = await page.evaluate((url) => new Promise((resolve) => {
      const ws = new WebSocket(url);
      ws.onopen = () => { ws.close(); resolve('open'); };
      ws.onerror = () => resolve('refused');
    }), `ws://${addr}/`);
    check(bare === 'refused', `a WebSocket with the cookie and no key: ${bare}`);
    // The browser logs that refusal; it is the one expected.
    await until('the refusal logged', async () => errors.some((e) => e.includes('ws://')));
    errors.splice(0, errors.length, ...errors.filter((e) => !e.includes('ws://')));
    // A page of another origin on this same host (so the browser sends the session cookie).
    const other = http.createServer((_, res) => { res.setHeader('Content-Type', 'text/html'); res.end('<p>elsewhere</p>'); });
    await new Promise((r) => other.listen(0, '127.0.0.1', r));
    const p2 = await context.newPage();
    try {
      await p2.goto(`http://127.0.0.1:${other.address().port}/`);
      const outcome = await p2.evaluate((url) => new Promise((resolve) => {
        const ws = new WebSocket(url);
        ws.onopen = () => resolve('open');
        ws.onerror = () => resolve('refused');
        setTimeout(() => resolve('no answer'), 5000);
      }), `ws://${addr}/`);
      check(outcome === 'refused', `the foreign page's WebSocket: ${outcome}`);
      // The daemon's own origin, with the same cookie and the session's key (which only
      // its own origin can read), is let in.
      const own = await page.evaluate((url) => new Promise((resolve) => {
        const ws = new WebSocket(`${url}?key=${localStorage.getItem('taskd_key')}`);
        ws.onopen = () => { ws.close(); resolve('open'); };
        ws.onerror = () => resolve('refused');
      }), `ws://${addr}/`);
      check(own === 'open', `the dashboard's own WebSocket: ${own}`);
    } finally {
      await p2.close();
      other.close();
    }
  });

  await step('text contrast passes WCAG AA on every view', async () => {
    const views = ['#/', '#/unit/nightly-backup', '#/events', '#/status', '#/add', '#/agents'];
    for (const v of views) {
      await page.goto(`${base}/${v}`);
      await page.waitForFunction(() => !document.querySelector('main').textContent.includes('Loading'));
      const bad = await page.evaluate(() => {
        const lum = (c) => {
          const [r, g, b] = c.match(/[\d.]+/g).slice(0, 3).map(Number).map((x) => {
            const v = x / 255;
            return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
          });
          return 0.2126 * r + 0.7152 * g + 0.0722 * b;
        };
        const bgOf = (el) => {
          for (let e = el; e; e = e.parentElement) {
            const c = getComputedStyle(e).backgroundColor;
            const a = c.match(/[\d.]+/g);
            if (a && (a.length < 4 || Number(a[3]) > 0.5)) return c;
          }
          return 'rgb(255, 255, 255)';
        };
        const out = [];
        for (const el of document.querySelectorAll('body *')) {
          const text = [...el.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent.trim()).join('');
          if (!text || el.offsetParent === null) continue;
          const st = getComputedStyle(el);
          const l1 = lum(st.color);
          const l2 = lum(bgOf(el));
          const ratio = (Math.max(l1, l2) + 0.05) / (Math.min(l1, l2) + 0.05);
          const large = parseFloat(st.fontSize) >= 24 || (parseFloat(st.fontSize) >= 18.66 && Number(st.fontWeight) >= 700);
          if (ratio < (large ? 3 : 4.5)) out.push(`${el.tagName}.${el.className} "${text.slice(0, 30)}" ${ratio.toFixed(2)}`);
        }
        return out;
      });
      check(bad.length === 0, `${v}: ${bad.join('; ')}`);
    }
  });

  await step('the page is usable from the keyboard', async () => {
    await page.goto(`${base}/#/`);
    await page.waitForSelector('tr[data-name="nightly-backup"]');
    await page.keyboard.press('/');
    check(await page.evaluate(() => document.activeElement.id) === 'q', '/ goes to the search');
    await page.keyboard.type('nightly');
    await page.keyboard.press('Tab');
    await page.keyboard.press('Tab');
    check(await page.evaluate(() => document.activeElement.textContent) === 'Add unit', 'Tab reaches Add unit');
    await page.keyboard.press('Tab');
    check(await page.evaluate(() => document.activeElement.textContent) === 'nightly-backup', 'then the unit');
    await page.keyboard.press('Enter');
    await page.waitForSelector('button[data-act=Start]');
  });

  await step('the layout holds at a phone\'s width', async () => {
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(`${base}/#/`);
    await page.waitForSelector('tr[data-name="nightly-backup"]');
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(overflow <= 0, `no sideways scrolling of the page (${overflow}px too wide)`);
    await shot('phone');
    await page.setViewportSize({ width: 1280, height: 800 });
  });

  check(errors.length === 0, `no errors in the page: ${errors.join(' | ')}`);
}

/** Time to render 1,000 units, and the page under 100 events a second (BENCHMARKS.md). */
async function measure() {
  const n = 1000;
  const existing = (await call('TaskUnit.List', {})).length;
  for (let i = existing; i < n; i += 100) {
    await Promise.all(Array.from({ length: Math.min(100, n - i) }, (_, k) => call('TaskUnit.Add', { name: `bench-${String(i + k).padStart(4, '0')}`, command: ['true'], every: '1h' })));
  }
  const renders = [];
  for (let i = 0; i < 5; i++) {
    await page.goto(`${base}/#/status`);
    await page.waitForSelector('#conn.live');
    const t = await page.evaluate(() => new Promise((resolve) => {
      const t0 = performance.now();
      location.hash = '#/';
      const check = () => {
        if (document.querySelectorAll('tr[data-name]').length >= 1000) {
          // Until the browser has laid the rows out and painted them.
          requestAnimationFrame(() => setTimeout(() => resolve(performance.now() - t0), 0));
        } else requestAnimationFrame(check);
      };
      check();
    }));
    renders.push(t);
  }
  renders.sort((a, b) => a - b);
  // 100 events a second for 10 s: units paused and resumed in turn, each change shown live.
  await page.evaluate(() => {
    window.__long = [];
    new PerformanceObserver((l) => { for (const e of l.getEntries()) window.__long.push(e.duration); }).observe({ type: 'longtask', buffered: false });
    window.__lag = [];
    let last = performance.now();
    window.__tick = setInterval(() => { const now = performance.now(); window.__lag.push(now - last - 50); last = now; }, 50);
  });
  const names = Array.from({ length: 100 }, (_, i) => `bench-${String(i).padStart(4, '0')}`);
  const start = Date.now();
  let sent = 0;
  const shownAfter = [];
  const inFlight = [];
  // Paced by the clock, not by the answers: 100 calls a second whatever each takes.
  while (Date.now() - start < 10000) {
    const due = start + sent * 10;
    const wait = due - Date.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    const name = names[sent % names.length];
    const pause = Math.floor(sent / names.length) % 2 === 0;
    const t0 = Date.now();
    const done = call(pause ? 'TaskUnit.Pause' : 'TaskUnit.Resume', name);
    if (sent % 20 === 0) {
      const want = pause ? 'paused' : 'waiting';
      inFlight.push(done.then(() => page.waitForSelector(`tr[data-name="${name}"] .s-${want}`)).then(() => shownAfter.push(Date.now() - t0)));
    } else inFlight.push(done);
    sent += 1;
  }
  await Promise.all(inFlight);
  const elapsed = (Date.now() - start) / 1000;
  const { long, lag } = await page.evaluate(() => { clearInterval(window.__tick); return { long: window.__long, lag: window.__lag }; });
  lag.sort((a, b) => a - b);
  shownAfter.sort((a, b) => a - b);
  const pct = (a, p) => (a.length ? a[Math.min(a.length - 1, Math.floor(p * a.length))] : 0);
  console.log(JSON.stringify({
    render_1000_ms: { p50: pct(renders, 0.5), max: renders[renders.length - 1] },
    events_per_s: sent / elapsed,
    change_shown_ms: { p50: pct(shownAfter, 0.5), max: shownAfter[shownAfter.length - 1] },
    long_tasks: long.length,
    long_task_ms_max: long.length ? Math.max(...long) : 0,
    timer_lag_ms: { p50: pct(lag, 0.5), p99: pct(lag, 0.99) },
  }));
}

let failed = false;
try {
  if (bench) { await signIn(); await measure(); } else await checks();
} catch (e) {
  failed = true;
  console.error(e.stack || String(e));
} finally {
  if (!bench) console.log(results.join('\n'));
  await browser.close();
}
process.exit(failed ? 1 : 0);
