// taskd dashboard: one page, no framework, no build step. It speaks the daemon's own
// JSON-RPC over one WebSocket (signed in by the session cookie set at POST /login) and stays
// live through Events.Subscribe and Run.Follow: nothing polls.

const main = document.getElementById('main');
const connEl = document.getElementById('conn');
const toastEl = document.getElementById('toast');

// ---------------------------------------------------------------- helpers

const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ESC[c]);
const enc = encodeURIComponent;

const SIGNALS = { 1: 'SIGHUP', 2: 'SIGINT', 3: 'SIGQUIT', 4: 'SIGILL', 6: 'SIGABRT', 8: 'SIGFPE',
  9: 'SIGKILL', 11: 'SIGSEGV', 13: 'SIGPIPE', 14: 'SIGALRM', 15: 'SIGTERM' };

/** "in 5 s", "3 min ago": a time relative to now. */
function relative(iso) {
  if (!iso) return '—';
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return esc(iso);
  const d = (t - Date.now()) / 1000;
  const a = Math.abs(d);
  let s;
  if (a < 1) return 'now';
  if (a < 60) s = `${Math.round(a)} s`;
  else if (a < 3600) s = `${Math.round(a / 60)} min`;
  else if (a < 86400) s = `${Math.round(a / 3600)} h`;
  else s = `${Math.round(a / 86400)} d`;
  return d > 0 ? `in ${s}` : `${s} ago`;
}

/** A time element that keeps its relative text fresh (see the ticker below). */
function when(iso) {
  if (!iso) return '<span class="muted">—</span>';
  return `<time datetime="${esc(iso)}" data-t="${esc(iso)}" title="${esc(new Date(iso).toLocaleString())}">${relative(iso)}</time>`;
}

/** "850 ms", "4.2 s", "3 min 4 s", "2 h 5 min". */
function duration(ms) {
  if (ms == null) return '—';
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** How a run ended, as people read it: "exit 0", "SIGTERM", "timed out". */
function ending(r) {
  if (!r) return '';
  if (r.signal != null) return `${SIGNALS[r.signal] || 'signal'} (${r.signal})`;
  if (r.exit_code != null) return `exit ${r.exit_code}`;
  return r.reason ? esc(r.reason) : '';
}

const badge = (state) => `<span class="badge s-${esc(state)}">${esc(String(state ?? '').replace('_', ' '))}</span>`;

function runDuration(r) {
  if (r.duration_ms != null) return r.duration_ms;
  if (r.started_at && !r.ended_at) return Date.now() - Date.parse(r.started_at);
  return null;
}

function toast(msg, info) {
  toastEl.textContent = msg;
  toastEl.className = info ? 'toast info' : 'toast';
  toastEl.hidden = false;
  clearTimeout(toast.t);
  toast.t = setTimeout(() => { toastEl.hidden = true; }, 5000);
}

/** Runs `fn` at most once per `ms`, the last call winning. */
function throttle(fn, ms) {
  let timer = null;
  let again = false;
  const run = () => {
    timer = null;
    if (again) { again = false; fn(); timer = setTimeout(run, ms); }
  };
  return () => {
    if (timer) { again = true; return; }
    fn();
    timer = setTimeout(run, ms);
  };
}

// Relative times and running durations, refreshed once a second.
setInterval(() => {
  for (const el of main.querySelectorAll('[data-t]')) {
    const text = relative(el.dataset.t);
    if (el.textContent !== text) el.textContent = text;
  }
}, 1000);

// ---------------------------------------------------------------- JSON-RPC over WebSocket

class RpcError extends Error {
  constructor(e) { super(e.message); this.code = e.code; this.data = e.data; }
}

const rpc = {
  ws: null,
  nextId: 1,
  pending: new Map(),
  subs: new Map(),
  early: new Map(),
  gone: new Set(),
  onOpen: null,
  onDown: null,

  open(key) {
    return new Promise((resolve, reject) => {
      // The session's key goes in the URL: the cookie alone does not open the socket (see
      // src/rpc/dashboard.rs for why).
      const ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/?key=${enc(key || '')}`);
      let opened = false;
      ws.onopen = () => { opened = true; this.ws = ws; resolve(); };
      ws.onmessage = (m) => { if (this.ws === ws) this.receive(m.data); };
      ws.onclose = () => {
        if (!opened) { reject(new Error('cannot connect')); return; }
        // A socket replaced by a newer one has nothing left to say.
        if (this.ws !== ws) return;
        this.ws = null;
        for (const p of this.pending.values()) p.reject(new RpcError({ message: 'connection lost' }));
        this.pending.clear();
        this.subs.clear();
        this.early.clear();
        this.gone.clear();
        if (this.onDown) this.onDown();
      };
    });
  },

  close() {
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close();
  },

  receive(text) {
    let msgs;
    try { msgs = JSON.parse(text); } catch { return; }
    for (const m of Array.isArray(msgs) ? msgs : [msgs]) {
      if (m.id != null && this.pending.has(m.id)) {
        const p = this.pending.get(m.id);
        this.pending.delete(m.id);
        if (m.error) p.reject(new RpcError(m.error)); else p.resolve(m.result);
      } else if (m.params && m.params.subscription != null) {
        const key = String(m.params.subscription);
        const on = this.subs.get(key);
        if (on) on(m.params.result);
        else if (!this.gone.has(key)) {
          // Before its subscribe call's answer was handled (bounded, in case it never is).
          if (!this.early.has(key)) { if (this.early.size >= 64) continue; this.early.set(key, []); }
          const kept = this.early.get(key);
          if (kept.length < 10000) kept.push(m.params.result);
        }
      }
    }
  },

  call(method, ...params) {
    if (!this.ws) return Promise.reject(new RpcError({ message: 'not connected' }));
    const id = this.nextId++;
    this.ws.send(JSON.stringify({ jsonrpc: '2.0', id, method, params }));
    return new Promise((resolve, reject) => this.pending.set(id, { resolve, reject }));
  },

  /** Subscribes; `onItem` gets each notification. Resolves to a function that unsubscribes. */
  async subscribe(method, unsubscribe, params, onItem) {
    const sub = await this.call(method, ...params);
    const key = String(sub);
    this.subs.set(key, onItem);
    for (const item of this.early.get(key) || []) onItem(item);
    this.early.delete(key);
    return () => {
      this.subs.delete(key);
      this.gone.add(key);
      this.call(unsubscribe, sub).catch(() => {});
    };
  },
};

// ---------------------------------------------------------------- events, shared by views

const listeners = new Set();
let lastSeq = null;

async function followEvents() {
  const arg = lastSeq == null ? {} : { after_seq: lastSeq };
  await rpc.subscribe('Events.Subscribe', 'Events.Unsubscribe', [arg], (e) => {
    if (e.seq != null) lastSeq = Math.max(lastSeq ?? 0, e.seq);
    for (const l of listeners) l(e);
  });
}

// ---------------------------------------------------------------- views

let current = null;

function setTitle(t) { document.title = t ? `${t} · taskd` : 'taskd'; }

function markNav(name) {
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === name) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
}

/** Calls `method`, showing a failure as a toast; resolves to the result or undefined. */
async function act(method, ...params) {
  try { return await rpc.call(method, ...params); } catch (e) { toast(`${method}: ${e.message}`); return undefined; }
}

// --- units

function scheduleOf(u) { return u.schedule || u.kind || ''; }

function unitRow(u) {
  const r = u.last_run;
  const last = r
    ? `${badge(r.state)} <a href="#/run/${r.id}">#${r.id}</a> ${ending(r)} <span class="muted">${when(r.ended_at || r.started_at || r.queued_at)}${r.duration_ms != null ? ` · ${duration(r.duration_ms)}` : ''}</span>`
    : '<span class="muted">never ran</span>';
  return `<tr data-name="${esc(u.name)}"><td><a href="#/unit/${enc(u.name)}">${esc(u.name)}</a>${u.description ? `<div class="desc">${esc(u.description)}</div>` : ''}</td>`
    + `<td>${badge(u.state)}</td><td class="hide-narrow"><code>${esc(scheduleOf(u))}</code></td>`
    + `<td class="hide-narrow">${when(u.next_fire)}</td><td>${last}</td></tr>`;
}

function unitsView() {
  const units = new Map();
  let q = '';
  let state = '';
  const dirty = new Set();
  let full = false;
  let stopped = false;
  markNav('units');
  setTitle('Units');
  main.innerHTML = `<h1>Units <span class="count" id="count"></span></h1>
    <div class="toolbar">
      <label class="grow"><span class="skip">Search units</span><input id="q" type="search" placeholder="Search by name or description (press /)" aria-label="Search units"></label>
      <label><span class="skip">State</span><select id="state" aria-label="Filter by state">
        <option value="">All states</option><option>running</option><option>waiting</option><option>backoff</option>
        <option>paused</option><option>done</option><option>fatal</option></select></label>
      <a class="button primary" href="#/add">Add unit</a>
    </div>
    <div class="table-wrap"><table aria-describedby="count"><thead><tr><th scope="col">Name</th><th scope="col">State</th>
      <th scope="col" class="hide-narrow">Schedule</th><th scope="col" class="hide-narrow">Next fire</th><th scope="col">Last run</th></tr></thead>
      <tbody id="rows"><tr><td colspan="5" class="empty">Loading…</td></tr></tbody></table></div>`;
  const tbody = main.querySelector('#rows');
  const count = main.querySelector('#count');
  const shown = (u) => (!state || u.state === state)
    && (!q || u.name.toLowerCase().includes(q) || (u.description || '').toLowerCase().includes(q));
  const render = () => {
    const list = [...units.values()].filter(shown).sort((a, b) => (a.name < b.name ? -1 : 1));
    tbody.innerHTML = list.length ? list.map(unitRow).join('') : `<tr><td colspan="5" class="empty">${units.size ? 'No unit matches.' : 'No units yet. <a href="#/add">Add one</a>.'}</td></tr>`;
    count.textContent = `${list.length} of ${units.size}`;
  };
  // A read of one unit waits for a read of the whole list under way, so that the list's
  // (older) answer never overwrites the unit's.
  let loading = Promise.resolve();
  const load = () => { loading = loadAll(); return loading; };
  const loadAll = async () => {
    const all = new Map();
    let after;
    for (;;) {
      const page = await rpc.call('TaskUnit.List', { limit: 10000, ...(after ? { after } : {}) });
      for (const u of page) all.set(u.name, u);
      if (page.length < 10000) break;
      after = page[page.length - 1].name;
    }
    units.clear();
    for (const [k, v] of all) units.set(k, v);
    render();
  };
  // Changes are gathered for 50 ms, then each changed unit is read again (or all of them,
  // after a burst); one row is replaced per unit.
  const flush = throttle(async () => {
    await loading.catch(() => {});
    if (stopped) return;
    if (full || dirty.size > 200) { full = false; dirty.clear(); await load(); return; }
    const names = [...dirty];
    dirty.clear();
    const got = await Promise.all(names.map((n) => rpc.call('TaskUnit.List', { name_glob: n, limit: 1 }).catch(() => [])));
    names.forEach((n, i) => {
      const u = got[i].find((x) => x.name === n);
      const row = tbody.querySelector(`tr[data-name="${CSS.escape(n)}"]`);
      if (!u) { units.delete(n); if (row) row.remove(); return; }
      const isNew = !units.has(n);
      units.set(n, u);
      if (isNew || !row) { render(); return; }
      if (shown(u)) row.outerHTML = unitRow(u); else row.remove();
    });
    count.textContent = `${tbody.querySelectorAll('tr[data-name]').length} of ${units.size}`;
  }, 50);
  const onEvent = (e) => {
    if (e.kind.startsWith('agent.')) return;
    if (e.kind === 'unit.deleted') { units.delete(e.unit); tbody.querySelector(`tr[data-name="${CSS.escape(e.unit)}"]`)?.remove(); return; }
    dirty.add(e.unit);
    flush();
  };
  main.querySelector('#q').addEventListener('input', (ev) => { q = ev.target.value.trim().toLowerCase(); render(); });
  main.querySelector('#state').addEventListener('change', (ev) => { state = ev.target.value; render(); });
  listeners.add(onEvent);
  load().catch((e) => toast(e.message));
  return { dispose() { stopped = true; listeners.delete(onEvent); }, reload: load };
}

// --- one unit

function definitionList(def) {
  return `<dl class="def">${Object.entries(def).map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(typeof v === 'string' ? v : JSON.stringify(v, null, 1))}</dd>`).join('')}</dl>`;
}

function runRows(runs) {
  if (!runs.length) return '<tr><td colspan="7" class="empty">No runs yet.</td></tr>';
  return runs.map((r) => `<tr><td><a href="#/run/${r.id}">#${r.id}</a></td><td>${badge(r.state)}</td><td>${esc(r.trigger)}</td>
    <td class="hide-narrow">${esc(r.host)}</td><td>${when(r.started_at || r.queued_at)}</td><td class="num">${duration(runDuration(r))}</td><td>${ending(r)}</td></tr>`).join('');
}

function unitView(name) {
  markNav('units');
  setTitle(name);
  let stopped = false;
  const load = async () => {
    let u;
    try { u = await rpc.call('TaskUnit.Get', name); } catch (e) {
      if (stopped) return;
      main.innerHTML = `<h1>${esc(name)}</h1><p class="panel">${esc(e.message)}</p><p><a href="#/">All units</a></p>`;
      return;
    }
    const hostList = u.definition.hosts || [];
    const remote = hostList.length > 0 && !(hostList.length === 1 && hostList[0] === 'local');
    const [runs, dispatches] = await Promise.all([
      rpc.call('Run.List', { unit: name, limit: 50 }).catch(() => []),
      remote ? rpc.call('Dispatch.List', { unit: name, limit: 20 }).catch(() => []) : Promise.resolve([]),
    ]);
    if (stopped) return;
    const paused = u.state === 'paused';
    main.innerHTML = `<h1>${esc(name)} ${badge(u.state)}</h1>
      <div class="toolbar" role="group" aria-label="Controls">
        <button type="button" class="primary" data-act="Start">Start</button>
        <button type="button" data-act="Stop">Stop</button>
        ${paused ? '<button type="button" data-act="Resume">Resume</button>' : '<button type="button" data-act="Pause">Pause</button>'}
        <a class="button" href="#/edit/${enc(name)}">Edit</a>
        <button type="button" class="danger" data-act="Delete">Delete</button>
      </div>
      <p class="muted">Next fire ${when(u.next_fire)} · ${u.runs_total} runs, ${u.failures_total} failed · added ${when(u.created_at)}</p>
      <h2>Definition</h2><div class="panel">${definitionList(u.definition)}</div>
      ${remote ? `<h2>Dispatches</h2><div class="table-wrap"><table><thead><tr><th>Dispatch</th><th>State</th><th>Hosts</th><th>Started</th></tr></thead><tbody>
        ${dispatches.length ? dispatches.map((d) => `<tr><td><a href="#/dispatch/${d.id}">#${d.id}</a></td><td>${badge(d.state)}</td><td>${d.total}</td><td>${when(d.created_at)}</td></tr>`).join('') : '<tr><td colspan="4" class="empty">None yet.</td></tr>'}
        </tbody></table></div>` : ''}
      <h2>History</h2><div class="table-wrap"><table><thead><tr><th>Run</th><th>State</th><th>Trigger</th><th class="hide-narrow">Host</th><th>Started</th><th class="num">Duration</th><th>Ended</th></tr></thead>
        <tbody id="history">${runRows(runs)}</tbody></table></div>`;
    for (const b of main.querySelectorAll('[data-act]')) {
      b.addEventListener('click', async () => {
        const a = b.dataset.act;
        if (a === 'Delete') {
          if (!window.confirm(`Delete unit ${name} and its history?`)) return;
          if (await act('TaskUnit.Delete', name) !== undefined) location.hash = '#/';
          return;
        }
        b.disabled = true;
        const r = await act(`TaskUnit.${a}`, name);
        b.disabled = false;
        if (a === 'Start' && r && r.id) toast(`Run #${r.id} started`, true);
      });
    }
  };
  const reload = throttle(() => { if (!stopped) load(); }, 150);
  const onEvent = (e) => { if (e.unit === name) reload(); };
  listeners.add(onEvent);
  main.innerHTML = `<h1>${esc(name)}</h1><p class="muted">Loading…</p>`;
  load();
  return { dispose() { stopped = true; listeners.delete(onEvent); }, reload: load };
}

// --- one run, its output live

function runView(id) {
  markNav('units');
  setTitle(`Run #${id}`);
  let stopped = false;
  let unfollow = null;
  main.innerHTML = `<h1>Run #${esc(id)} <span id="state"></span></h1>
    <div class="toolbar" id="controls"></div>
    <p id="facts" class="muted"></p>
    <p class="legend">Output: standard output in light text, <span class="err-key">standard error in red</span>.</p>
    <pre class="output" id="out" tabindex="0" aria-label="Output" aria-live="off"></pre>`;
  const out = main.querySelector('#out');
  const MAX = 2 << 20;
  let size = 0;
  const append = (text, cls) => {
    const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
    const span = document.createElement('span');
    if (cls) span.className = cls;
    span.textContent = text;
    out.appendChild(span);
    size += text.length;
    while (size > MAX && out.firstChild) { size -= out.firstChild.textContent.length; out.firstChild.remove(); }
    if (atEnd) out.scrollTop = out.scrollHeight;
  };
  const show = (r) => {
    main.querySelector('#state').innerHTML = badge(r.state);
    const active = r.state === 'running' || r.state === 'queued';
    main.querySelector('#facts').innerHTML = `Unit <a href="#/unit/${enc(r.unit)}">${esc(r.unit)}</a> · host ${esc(r.host)} · ${esc(r.trigger)}`
      + `${r.dispatch ? ` · <a href="#/dispatch/${r.dispatch}">dispatch #${r.dispatch}</a>` : ''} · started ${when(r.started_at)}`
      + `${r.ended_at ? ` · ran ${duration(r.duration_ms)} · ${ending(r) || 'ended'}` : ''}${r.reason ? ` · ${esc(r.reason)}` : ''}`;
    const c = main.querySelector('#controls');
    c.innerHTML = active ? '<button type="button" class="danger" id="cancel">Cancel run</button>' : '';
    if (active) {
      c.querySelector('#cancel').addEventListener('click', async (ev) => {
        ev.target.disabled = true;
        await act('Run.Cancel', Number(id));
      });
    }
  };
  (async () => {
    try { show(await rpc.call('Run.Get', Number(id))); } catch (e) { append(`${e.message}\n`, 'note'); return; }
    if (stopped) return;
    // One subscription per stream, so that what was written before is told apart too.
    const follow = (stream) => rpc.subscribe('Run.Follow', 'Run.Unfollow', [{ id: Number(id), stream }], (item) => {
      if (item.kind === 'output') append(item.data, stream === 'stderr' ? 'err' : '');
      else if (item.kind === 'end') show(item.run);
      else if (item.kind === 'lagged') append(`\n${item.message}\n`, 'note');
    });
    const got = await Promise.allSettled([follow('stdout'), follow('stderr')]);
    const subs = got.filter((r) => r.status === 'fulfilled').map((r) => r.value);
    const failed = got.find((r) => r.status === 'rejected');
    if (failed) append(`${failed.reason.message}\n`, 'note');
    unfollow = () => subs.forEach((u) => u());
    if (stopped) unfollow();
  })();
  return { dispose() { stopped = true; if (unfollow) unfollow(); } };
}

// --- a dispatch: a grid of hosts

function dispatchView(id) {
  markNav('units');
  setTitle(`Dispatch #${id}`);
  let stopped = false;
  let unit = null;
  let selected = null;
  const load = async () => {
    let d;
    try { d = await rpc.call('Dispatch.Get', Number(id)); } catch (e) {
      if (stopped) return;
      main.innerHTML = `<h1>Dispatch #${esc(id)}</h1><p class="panel">${esc(e.message)}</p>`;
      return;
    }
    if (stopped) return;
    unit = d.unit;
    // The newest run of each host.
    const byHost = new Map();
    for (const r of d.runs || []) { const o = byHost.get(r.host); if (!o || r.id > o.id) byHost.set(r.host, r); }
    const hosts = [...byHost.values()].sort((a, b) => (a.host < b.host ? -1 : 1));
    const stateOf = (r) => (r.ignored || r.host_state === 'ignored' ? 'ignored' : r.state);
    const tally = { ok: 0, bad: 0, run: 0, other: 0 };
    for (const r of hosts) {
      const s = stateOf(r);
      if (s === 'succeeded') tally.ok++;
      else if (['failed', 'timed_out', 'lost'].includes(s)) tally.bad++;
      else if (s === 'running') tally.run++;
      else if (s !== 'queued') tally.other++;
    }
    const ended = tally.ok + tally.bad + tally.other;
    const pct = (n) => (d.total ? (100 * n) / d.total : 0);
    const open = !d.ended_at;
    main.innerHTML = `<h1>Dispatch #${esc(id)} ${badge(d.state)}</h1>
      <p class="muted">Unit <a href="#/unit/${enc(d.unit)}">${esc(d.unit)}</a> · ${esc(d.trigger)} · started ${when(d.created_at)}${d.ended_at ? ` · ended ${when(d.ended_at)}` : ''}</p>
      <div class="toolbar" role="group" aria-label="Dispatch controls">
        ${open ? '<button type="button" class="danger" data-d="Cancel">Cancel dispatch</button>' : ''}
        ${open && d.state !== 'paused' ? '<button type="button" data-d="Pause">Pause</button>' : ''}
        ${d.state === 'paused' ? '<button type="button" data-d="Resume">Resume</button>' : ''}
      </div>
      <p id="progress-text"><strong>${ended}</strong> of ${d.total} hosts done: ${tally.ok} succeeded, ${tally.bad} failed, ${tally.run} running</p>
      <div class="progress" role="progressbar" aria-labelledby="progress-text" aria-valuemin="0" aria-valuemax="${d.total}" aria-valuenow="${ended}">
        <span class="p-ok" data-w="${pct(tally.ok)}"></span><span class="p-bad" data-w="${pct(tally.bad)}"></span>
        <span class="p-other" data-w="${pct(tally.other)}"></span><span class="p-run" data-w="${pct(tally.run)}"></span></div>
      <div class="grid" id="grid">${hosts.map((r) => `<button type="button" class="host s-${esc(stateOf(r))}" data-run="${r.id}" data-host="${esc(r.host)}" aria-pressed="${selected === r.host}">
        <strong>${esc(r.host)}</strong>${esc(stateOf(r).replace('_', ' '))}${r.ended_at ? ` · ${ending(r)}` : ''}</button>`).join('')}</div>
      <div id="hostmenu" class="hostmenu"></div>`;
    // Widths through the CSSOM: the page's policy allows no inline style attribute.
    for (const bar of main.querySelectorAll('[data-w]')) bar.style.width = `${bar.dataset.w}%`;
    for (const b of main.querySelectorAll('[data-d]')) {
      b.addEventListener('click', () => act(`Dispatch.${b.dataset.d}`, Number(id)));
    }
    const menu = (r) => {
      selected = r.host;
      const s = stateOf(r);
      const m = main.querySelector('#hostmenu');
      m.innerHTML = `<div class="panel"><strong>${esc(r.host)}</strong> ${badge(s)} run <a href="#/run/${r.id}">#${r.id}</a> ${ending(r)}
        <div class="toolbar spaced">
        ${s === 'running' ? `<button type="button" class="danger" data-r="Cancel">Cancel on ${esc(r.host)}</button>` : ''}
        ${r.ended_at ? `<button type="button" data-r="Redo">Redo on ${esc(r.host)}</button>` : ''}
        ${['failed', 'timed_out', 'lost', 'cancelled'].includes(s) ? `<button type="button" data-r="Ignore">Ignore ${esc(r.host)}</button>` : ''}
        <a class="button" href="#/run/${r.id}">Output</a></div></div>`;
      for (const b of m.querySelectorAll('[data-r]')) b.addEventListener('click', () => act(`Run.${b.dataset.r}`, r.id));
    };
    for (const b of main.querySelectorAll('.host')) {
      b.addEventListener('click', () => menu(byHost.get(b.dataset.host)));
    }
    if (selected && byHost.has(selected)) menu(byHost.get(selected));
  };
  const reload = throttle(() => { if (!stopped) load(); }, 100);
  const onEvent = (e) => { if (unit === null || e.unit === unit) reload(); };
  listeners.add(onEvent);
  main.innerHTML = `<h1>Dispatch #${esc(id)}</h1><p class="muted">Loading…</p>`;
  load();
  return { dispose() { stopped = true; listeners.delete(onEvent); }, reload: load };
}

// --- agents

function agentsView() {
  markNav('agents');
  setTitle('Agents');
  let stopped = false;
  const load = async () => {
    const agents = await rpc.call('Agent.List', {}).catch((e) => { toast(e.message); return []; });
    if (stopped) return;
    main.innerHTML = `<h1>Agents <span class="count">${agents.length}</span></h1>
      <div class="table-wrap"><table><thead><tr><th>Name</th><th>State</th><th class="hide-narrow">Labels</th><th>Runs</th>
        <th class="hide-narrow">Version</th><th>Last seen</th></tr></thead><tbody>
      ${agents.length ? agents.map((a) => `<tr><td>${esc(a.name)}<div class="desc">${esc(a.addr || '')}</div></td><td>${badge(a.state)}</td>
        <td class="hide-narrow">${Object.entries(a.labels || {}).map(([k, v]) => `<code>${esc(k)}=${esc(v)}</code>`).join(' ')}</td>
        <td class="num">${a.running} / ${a.max_runs}</td><td class="hide-narrow">${esc(a.version)} ${esc(a.os)}/${esc(a.arch)}</td><td>${when(a.last_seen)}</td></tr>`).join('')
        : '<tr><td colspan="6" class="empty">No agent enrolled. <code>taskctl agent token</code>, then <code>taskd agent --join …</code> on a host.</td></tr>'}
      </tbody></table></div>`;
  };
  const reload = throttle(() => { if (!stopped) load(); }, 300);
  const onEvent = (e) => { if (e.kind.startsWith('agent.') || e.kind.startsWith('run.')) reload(); };
  listeners.add(onEvent);
  main.innerHTML = '<h1>Agents</h1><p class="muted">Loading…</p>';
  load();
  return { dispose() { stopped = true; listeners.delete(onEvent); }, reload: load };
}

// --- the event stream

function eventsView() {
  markNav('events');
  setTitle('Events');
  const KEEP = 500;
  let paused = false;
  let filter = '';
  const kept = [];
  main.innerHTML = `<h1>Events</h1>
    <div class="toolbar"><label class="grow"><span class="skip">Filter</span><input id="f" type="search" placeholder="Filter by unit or kind" aria-label="Filter events"></label>
      <button type="button" id="pause" aria-pressed="false">Pause</button></div>
    <div class="table-wrap"><table><thead><tr><th>Time</th><th>Kind</th><th>Unit</th><th>Run</th><th>State</th></tr></thead>
    <tbody id="ev"><tr><td colspan="5" class="empty">Waiting for events…</td></tr></tbody></table></div>`;
  const tbody = main.querySelector('#ev');
  const row = (e) => `<tr><td><time datetime="${esc(e.time)}">${esc(new Date(e.time).toLocaleTimeString())}</time></td><td><code>${esc(e.kind)}</code></td>
    <td>${e.kind.startsWith('agent.') ? `<a href="#/agents">${esc(e.unit)}</a>` : `<a href="#/unit/${enc(e.unit)}">${esc(e.unit)}</a>`}</td><td>${e.run != null ? (e.kind.startsWith('dispatch.') ? `<a href="#/dispatch/${e.run}">#${e.run}</a>` : `<a href="#/run/${e.run}">#${e.run}</a>`) : ''}</td>
    <td>${e.state ? badge(e.state) : ''}</td></tr>`;
  const match = (e) => !filter || e.unit.toLowerCase().includes(filter) || e.kind.includes(filter);
  const render = () => { tbody.innerHTML = kept.filter(match).map(row).join('') || '<tr><td colspan="5" class="empty">No events yet.</td></tr>'; };
  // At 100 events a second, rows are added once per frame, not once per event.
  let queued = [];
  let frame = 0;
  const draw = () => {
    frame = 0;
    const add = queued.filter(match);
    queued = [];
    if (!add.length) return;
    if (tbody.querySelector('.empty')) tbody.innerHTML = '';
    tbody.insertAdjacentHTML('afterbegin', add.reverse().map(row).join(''));
    while (tbody.rows.length > KEEP) tbody.deleteRow(-1);
  };
  const onEvent = (e) => {
    kept.unshift(e);
    if (kept.length > KEEP) kept.pop();
    if (paused) return;
    queued.push(e);
    if (!frame) frame = requestAnimationFrame(draw);
  };
  main.querySelector('#f').addEventListener('input', (ev) => { filter = ev.target.value.trim().toLowerCase(); render(); });
  main.querySelector('#pause').addEventListener('click', (ev) => {
    paused = !paused;
    ev.target.textContent = paused ? 'Resume' : 'Pause';
    ev.target.setAttribute('aria-pressed', String(paused));
    if (!paused) render();
  });
  listeners.add(onEvent);
  return { dispose() { listeners.delete(onEvent); if (frame) cancelAnimationFrame(frame); }, keep: true };
}

// --- daemon or cluster status

function statusView() {
  markNav('status');
  setTitle('Status');
  let stopped = false;
  const load = async () => {
    const s = await rpc.call('Daemon.Status', {}).catch((e) => { toast(e.message); return null; });
    if (!s || stopped) return;
    const kv = (o) => Object.entries(o || {}).map(([k, v]) => `${esc(k)} ${esc(v)}`).join(' · ') || '—';
    const c = s.cluster;
    main.innerHTML = `<h1>Status</h1>
      <div class="panel"><dl class="def">
        <dt>Version</dt><dd>${esc(s.version)} (pid ${s.pid})</dd>
        <dt>Up since</dt><dd>${when(s.started_at)}</dd>
        <dt>Units</dt><dd>${kv(s.units)}</dd>
        <dt>Runs</dt><dd>${kv(s.runs)}</dd>
        <dt>Agents</dt><dd>${kv(s.agents)}</dd>
        <dt>Store</dt><dd>${esc(s.store)} · ${s.store_commits} commits</dd>
        <dt>Listening</dt><dd>${esc((s.listeners || []).join(', '))} · auth ${esc(s.auth)}</dd>
        <dt>Connections</dt><dd>${kv(s.connections)}</dd>
        <dt>State directory</dt><dd>${esc(s.state_dir)}</dd>
      </dl></div>
      ${c ? `<h2>Cluster</h2><div class="panel"><pre class="mono">${esc(JSON.stringify(c, null, 2))}</pre></div>` : ''}
      <p><button type="button" id="refresh">Refresh</button></p>`;
    main.querySelector('#refresh').addEventListener('click', load);
  };
  const reload = throttle(() => { if (!stopped) load(); }, 1000);
  const onEvent = () => reload();
  listeners.add(onEvent);
  main.innerHTML = '<h1>Status</h1><p class="muted">Loading…</p>';
  load();
  return { dispose() { stopped = true; listeners.delete(onEvent); }, reload: load };
}

// --- add and edit

const FIELDS = [
  ['name', 'Name', 'text', 'Letters, digits, . _ - ; it cannot change later.'],
  ['description', 'Description', 'text', ''],
  ['command', 'Command', 'textarea', 'One argument per line (no shell), or leave empty and give a script.'],
  ['script', 'Script', 'textarea', 'Run by its #! line (or /bin/sh).'],
  ['every', 'Every', 'text', 'e.g. 30s, 5m, 1h'],
  ['cron', 'Cron', 'text', 'e.g. 0 3 * * * (minute hour day month weekday)'],
  ['hosts', 'Hosts', 'textarea', 'One per line: an agent name, or a label selector (role=web,dc=eu: both labels); empty: this daemon.'],
  ['user', 'User', 'text', ''],
  ['cwd', 'Working directory', 'text', ''],
  ['timeout', 'Timeout', 'text', 'e.g. 10m'],
  ['retries', 'Retries', 'number', ''],
  ['env', 'Environment', 'textarea', 'KEY=value, one per line.'],
];

/** The form field an API error names (`notify[0].url` → notify, `schedule.every` → every). */
function fieldOf(name) {
  if (!name) return null;
  const base = String(name).split(/[[.]/)[0];
  if (FIELDS.some(([f]) => f === base)) return base;
  if (base === 'args') return 'command';
  if (base === 'service' || base === 'kind') return 'kind';
  return null;
}

function formValues(def) {
  const v = {};
  for (const [f] of FIELDS) v[f] = '';
  if (!def) return v;
  v.name = def.name || '';
  v.description = def.description || '';
  if (Array.isArray(def.command)) v.command = def.command.join('\n');
  v.script = def.script || '';
  v.every = def.every || '';
  v.cron = def.cron || '';
  v.hosts = (def.hosts || []).join('\n');
  v.user = def.user || '';
  v.cwd = def.cwd || '';
  v.timeout = def.timeout || '';
  v.retries = def.retries ?? '';
  v.env = Object.entries(def.env || {}).map(([k, x]) => `${k}=${x}`).join('\n');
  return v;
}

/** The definition the form holds: each field's value, or null for an empty one. */
function formDefinition(form, kind) {
  const val = (f) => form.elements[f].value.trim();
  const lines = (f) => form.elements[f].value.split('\n').filter((l) => l.trim() !== '');
  const def = {};
  const set = (k, x) => { def[k] = x === '' || (Array.isArray(x) && !x.length) ? null : x; };
  set('description', val('description'));
  // Arguments as typed (one per line), not trimmed: a space may be part of one.
  set('command', lines('command'));
  set('script', form.elements.script.value.trim() ? form.elements.script.value : '');
  set('every', kind === 'every' ? val('every') : '');
  set('cron', kind === 'cron' ? val('cron') : '');
  def.service = kind === 'service' ? true : null;
  set('hosts', lines('hosts').map((h) => h.trim()));
  set('user', val('user'));
  set('cwd', val('cwd'));
  set('timeout', val('timeout'));
  set('retries', val('retries') === '' ? '' : Number(val('retries')));
  const env = {};
  for (const line of lines('env')) {
    const i = line.indexOf('=');
    if (i > 0) env[line.slice(0, i).trim()] = line.slice(i + 1);
  }
  def.env = Object.keys(env).length ? env : null;
  return def;
}

/** What an edit changes: only the fields whose value differs from `was` (a JSON merge
 * patch: null removes a field; an environment variable left out is removed by name). */
function formPatch(def, was) {
  const patch = {};
  const same = (a, b) => JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
  for (const [k, v] of Object.entries(def)) {
    if (k === 'env') continue;
    if (!same(v, was[k] ?? null)) patch[k] = v;
  }
  const before = was.env || {};
  const after = def.env || {};
  if (!same(before, after)) {
    const env = { ...after };
    for (const k of Object.keys(before)) if (!(k in after)) env[k] = null;
    patch.env = env;
  }
  return patch;
}

function formView(editing) {
  markNav('units');
  setTitle(editing ? `Edit ${editing}` : 'Add a unit');
  let stopped = false;
  const draw = (def) => {
    const v = formValues(def);
    const kind = def?.service ? 'service' : def?.cron ? 'cron' : def?.every ? 'every' : 'once';
    const input = ([f, label, type, hint]) => {
      const attrs = `id="f-${f}" name="${f}" aria-describedby="h-${f} e-${f}"${f === 'name' && editing ? ' readonly' : ''}`;
      const control = type === 'textarea'
        ? `<textarea ${attrs} rows="${f === 'script' ? 5 : 3}">${esc(v[f])}</textarea>`
        : `<input ${attrs} type="${type}" value="${esc(v[f])}"${type === 'number' ? ' min="0"' : ''}>`;
      return `<div class="field" data-field="${f}"><label for="f-${f}">${esc(label)}</label>${control}
        <p class="hint" id="h-${f}">${esc(hint)}</p><p class="err" id="e-${f}" hidden></p></div>`;
    };
    const by = Object.fromEntries(FIELDS.map((x) => [x[0], x]));
    main.innerHTML = `<h1>${editing ? `Edit ${esc(editing)}` : 'Add a unit'}</h1>
      <form class="unit panel" novalidate>
        <p class="form-err" id="form-err" role="alert" hidden></p>
        ${input(by.name)}${input(by.description)}
        <fieldset class="field" data-field="kind"><legend>Runs</legend>
          ${[['once', 'When started'], ['every', 'Every…'], ['cron', 'On a cron schedule'], ['service', 'As a service (kept running)']].map(([k, l]) => `<label><input type="radio" name="kind" value="${k}"${k === kind ? ' checked' : ''}> ${l}</label>`).join('')}
          <p class="err" id="e-kind" hidden></p></fieldset>
        <div class="row2">${input(by.every)}${input(by.cron)}</div>
        ${input(by.command)}${input(by.script)}${input(by.hosts)}
        <div class="row2">${input(by.user)}${input(by.cwd)}</div>
        <div class="row2">${input(by.timeout)}${input(by.retries)}</div>
        ${input(by.env)}
        <div class="toolbar"><button type="submit" class="primary">${editing ? 'Save' : 'Add unit'}</button>
          <a class="button" href="${editing ? `#/unit/${enc(editing)}` : '#/'}">Cancel</a></div>
      </form>`;
    const form = main.querySelector('form');
    // As the form showed it when it opened: on an edit, fields left alone are not sent.
    const was = formDefinition(form, kind);
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      for (const el of form.querySelectorAll('.err, .form-err')) { el.hidden = true; el.textContent = ''; }
      for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
      const kindNow = form.elements.kind.value;
      const def = formDefinition(form, kindNow);

      const button = form.querySelector('button[type=submit]');
      button.disabled = true;
      try {
        if (editing) {
          await rpc.call('TaskUnit.Edit', { name: editing, ...formPatch(def, was) });
          location.hash = `#/unit/${enc(editing)}`;
        } else {
          const clean = Object.fromEntries(Object.entries(def).filter(([, x]) => x !== null));
          const name = form.elements.name.value.trim();
          await rpc.call('TaskUnit.Add', { name, ...clean });
          location.hash = `#/unit/${enc(name)}`;
        }
      } catch (e) {
        const f = fieldOf(e.data && e.data.field);
        const target = f && form.querySelector(`#e-${f}`);
        if (target) {
          target.textContent = e.message;
          target.hidden = false;
          const control = form.querySelector(`#f-${f}`) || form.querySelector(`[name=${f}]`);
          if (control) { control.setAttribute('aria-invalid', 'true'); control.focus(); }
        } else {
          const el = form.querySelector('#form-err');
          el.textContent = e.message;
          el.hidden = false;
        }
      } finally {
        button.disabled = false;
      }
    });
    form.elements[editing ? 'description' : 'name'].focus();
  };
  if (editing) {
    rpc.call('TaskUnit.Get', editing).then((u) => { if (!stopped) draw(u.definition); }, (e) => toast(e.message));
  } else {
    draw(null);
  }
  return { dispose() { stopped = true; }, keep: true };
}

// ---------------------------------------------------------------- sign-in and routing

function loginView(message) {
  setTitle('Sign in');
  main.innerHTML = `<div class="login panel"><h1>Sign in to taskd</h1>
    <form method="post" action="/login"><label for="token">Token</label>
    <input id="token" name="token" type="password" autocomplete="current-password" required>
    <p class="hint muted">The daemon's token is in <code>&lt;state-dir&gt;/token</code> (for example <code>~/.local/state/taskd/token</code>).</p>
    <p class="form-err" id="login-err" role="alert" ${message ? '' : 'hidden'}>${esc(message || '')}</p>
    <button type="submit" class="primary">Sign in</button></form></div>`;
  const form = main.querySelector('form');
  form.elements.token.focus();
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const r = await fetch('/login', { method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ token: form.elements.token.value.trim() }) });
    const answer = await r.json().catch(() => ({}));
    if (r.ok && answer.key) { localStorage.setItem(KEY, answer.key); start(); } else loginView(answer.error || 'Sign-in refused');
  });
}

const ROUTES = [
  [/^#?\/?$/, () => unitsView()],
  [/^#\/unit\/(.+)$/, (m) => unitView(decodeURIComponent(m[1]))],
  [/^#\/run\/(\d+)$/, (m) => runView(m[1])],
  [/^#\/dispatch\/(\d+)$/, (m) => dispatchView(m[1])],
  [/^#\/agents$/, () => agentsView()],
  [/^#\/events$/, () => eventsView()],
  [/^#\/status$/, () => statusView()],
  [/^#\/add$/, () => formView(null)],
  [/^#\/edit\/(.+)$/, (m) => formView(decodeURIComponent(m[1]))],
];

function route() {
  if (!rpc.ws) return;
  toastEl.hidden = true;
  if (current && current.dispose) current.dispose();
  current = null;
  const hash = location.hash || '#/';
  for (const [re, view] of ROUTES) {
    const m = hash.match(re);
    if (!m) continue;
    try { current = view(m); } catch { break; }
    return;
  }
  main.innerHTML = '<h1>Not found</h1><p><a href="#/">All units</a></p>';
}

function setConn(state, text) {
  connEl.className = `conn ${state}`;
  connEl.textContent = text;
}

/** Where the session's key is kept: storage of this exact origin (scheme, host, port). */
const KEY = 'taskd_key';
let retry = 500;
let starting = false;
let timer = 0;

function later() {
  clearTimeout(timer);
  timer = setTimeout(start, retry);
  retry = Math.min(retry * 2, 10000);
}

/** Signs in (or asks to), connects, follows the events and shows the view; one at a time. */
async function start() {
  if (starting) return;
  starting = true;
  try {
    setConn('', 'connecting…');
    const session = await fetch('/login').then((r) => r.json()).catch(() => null);
    if (!session) { setConn('down', 'daemon unreachable'); later(); return; }
    document.getElementById('logout').hidden = !session.auth;
    const key = localStorage.getItem(KEY) || '';
    if (!session.signed_in || (session.auth && !key)) { setConn('down', 'signed out'); loginView(); return; }
    const reconnect = current !== null;
    try {
      await rpc.open(key);
      await followEvents();
    } catch {
      rpc.close();
      // Refused (a key of an ended session) or unreachable: the next try says which.
      setConn('down', 'offline, retrying');
      later();
      return;
    }
    retry = 500;
    setConn('live', 'live');
    // A form keeps what was typed into it across a reconnection; other views read again.
    if (reconnect && current && current.keep) return;
    route();
  } finally {
    starting = false;
  }
}

rpc.onDown = () => {
  setConn('down', 'connection lost, retrying');
  later();
};

window.addEventListener('hashchange', route);
document.getElementById('logout').addEventListener('click', async () => {
  await fetch('/logout', { method: 'POST' });
  localStorage.removeItem(KEY);
  rpc.close();
  location.hash = '#/';
  location.reload();
});
document.addEventListener('keydown', (e) => {
  const typing = /^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement?.tagName || '');
  if (e.key === '/' && !typing) {
    const q = main.querySelector('input[type=search]');
    if (q) { e.preventDefault(); q.focus(); }
  }
});

start();
