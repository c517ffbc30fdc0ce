// The comparison page: one column per loaded format, each streaming its continuation from
// /v1/completions (same prompt, seed and settings), and POST /v1/diff for where the formats
// depart from the base along the base's continuation (KLD, flips, every format's top-5).
'use strict';

const $ = (sel) => document.querySelector(sel);
const state = { models: [], diff: null, key: sessionStorage.getItem('ggpt-key') || '', run: 0 };

class ApiError extends Error {}

// fetch with the API key (if any); a non-2xx answer becomes an ApiError carrying the server's
// message (OpenAI's {"error": {"message"}} shape) so it can be shown, never swallowed.
async function api(path, body) {
  const headers = {};
  if (state.key) headers.Authorization = 'Bearer ' + state.key;
  const opts = { headers, method: body === undefined ? 'GET' : 'POST' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, opts);
  } catch (e) {
    throw new ApiError(`${path}: the server cannot be reached (${e.message})`);
  }
  if (!res.ok) {
    let msg = `${res.status} ${res.statusText}`;
    try {
      const j = await res.json();
      if (j && j.error && j.error.message) msg = `${res.status}: ${j.error.message}`;
    } catch (_) { /* not JSON: keep the status line */ }
    if (res.status === 401) $('#key-label').hidden = false;
    const err = new ApiError(msg);
    err.status = res.status;
    throw err;
  }
  return res;
}

function showError(msg) {
  const box = $('#error');
  box.textContent = box.hidden || !box.textContent ? msg : box.textContent + '\n' + msg;
  box.hidden = false;
}

function clearError() {
  $('#error').textContent = '';
  $('#error').hidden = true;
}

function setStatus(text) { $('#status').textContent = text; }

const fmtP = (p) => (p >= 0.995 ? p.toFixed(3) : p >= 0.01 ? p.toFixed(3) : p.toExponential(1));
const fmtK = (k) => (k === 0 ? '0' : k >= 0.001 ? k.toFixed(4) : k.toExponential(2));
const show = (t) => JSON.stringify(t).slice(1, -1);

async function loadModels() {
  const res = await api('/v1/models');
  const j = await res.json();
  state.models = j.data.map((m) => m.id);
  const sel = $('#base');
  sel.innerHTML = '';
  for (const m of state.models) {
    const o = document.createElement('option');
    o.value = m;
    o.textContent = m;
    sel.appendChild(o);
  }
  // The unquantized file is the natural base.
  const f16 = state.models.find((m) => /F16|F32|BF16/i.test(m));
  if (f16) sel.value = f16;
}

const MIB = 1024 * 1024;

async function loadReport() {
  let j;
  try {
    j = await (await api('/report')).json();
  } catch (e) {
    if (e.status === 404) return; // no --report given: no panel
    throw e;
  }
  const r = j.report;
  $('#report-setup').textContent =
    `Model ${r.setup.model}, text ${r.setup.text}: ${r.setup.method}. Memory at context ${r.setup.mem_ctx}.`;
  const cols = [
    ['format', (f) => f.format],
    ['file MiB', (f) => (f.file_bytes / MIB).toFixed(2)],
    ['bpw', (f) => f.bits_per_weight.toFixed(2)],
    ['RAM est. MiB', (f) => (f.ram_estimate_bytes / MIB).toFixed(1)],
    ['VRAM est. MiB', (f) => (f.vram_estimate_bytes / MIB).toFixed(1)],
    ['PPL', (f) => `${f.ppl.toFixed(3)} ± ${f.ppl_err.toFixed(3)}`],
    ['ΔPPL', (f) => `${f.delta_ppl_pct >= 0 ? '+' : ''}${f.delta_ppl_pct.toFixed(3)} %`],
    ['mean KLD', (f) => f.mean_kld.toFixed(6)],
    ['top-1 agree', (f) => `${f.same_top_pct.toFixed(2)} %`],
  ];
  const table = $('#report-table');
  table.innerHTML = '';
  const head = table.createTHead().insertRow();
  for (const [name] of cols) {
    const th = document.createElement('th');
    th.scope = 'col';
    th.textContent = name;
    head.appendChild(th);
  }
  const body = table.createTBody();
  for (const f of r.formats) {
    const row = body.insertRow();
    for (const [, get] of cols) row.insertCell().textContent = get(f);
  }
  const charts = $('#charts');
  charts.innerHTML = '';
  for (const stem of ['ppl_vs_size', 'kld_vs_size']) {
    const file = j.charts.includes(stem + '.svg') ? stem + '.svg' : j.charts.includes(stem + '.png') ? stem + '.png' : null;
    if (!file) continue;
    const blob = await (await api('/report/' + file)).blob();
    const img = document.createElement('img');
    img.src = URL.createObjectURL(blob);
    img.alt = stem === 'ppl_vs_size' ? 'Perplexity against file size per format' : 'KL divergence from F16 against file size per format';
    charts.appendChild(img);
  }
  $('#report').hidden = false;
}

// One column per model, the base first.
function makeColumns(order, prompt) {
  const wrap = $('#columns');
  wrap.innerHTML = '';
  const cols = {};
  for (const m of order) {
    const sec = document.createElement('section');
    sec.className = 'col';
    sec.setAttribute('aria-label', m);
    const h = document.createElement('h2');
    const name = document.createElement('span');
    name.textContent = m + (m === order[0] ? ' (base)' : '');
    const meta = document.createElement('span');
    meta.className = 'meta';
    h.append(name, meta);
    const text = document.createElement('div');
    text.className = 'text';
    const p = document.createElement('span');
    p.className = 'prompt';
    p.textContent = prompt;
    text.appendChild(p);
    sec.append(h, text);
    wrap.appendChild(sec);
    cols[m] = { sec, text, meta, tokens: [] };
  }
  return cols;
}

function addToken(col, model, text, logprob) {
  const i = col.tokens.length;
  const span = document.createElement('span');
  span.className = 'tok';
  span.textContent = text;
  const p = logprob == null ? 1 : Math.exp(logprob);
  span.style.setProperty('--p', p.toFixed(4));
  span.dataset.i = i;
  span.dataset.model = model;
  span.dataset.p = p;
  span.tabIndex = i === 0 ? 0 : -1;
  span.setAttribute('aria-label', `${show(text)}, p ${fmtP(p)}`);
  col.text.appendChild(span);
  col.tokens.push({ text, p, span });
}

// Read an SSE stream of completion chunks into a column.
async function stream(model, body, col, run) {
  const res = await api('/v1/completions', { ...body, model, stream: true, logprobs: 5 });
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    if (run !== state.run) { reader.cancel(); return; }
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split('\n')) {
        if (!line.startsWith('data:')) continue;
        const data = line.slice(5).trim();
        if (data === '[DONE]') return;
        const j = JSON.parse(data);
        if (j.error) throw new ApiError(`${model}: ${j.error.message}`);
        for (const c of j.choices || []) {
          const lp = c.logprobs;
          if (lp && lp.tokens) {
            lp.tokens.forEach((t, k) => addToken(col, model, t, lp.token_logprobs[k]));
          } else if (c.text) {
            addToken(col, model, c.text, null);
          }
          if (c.finish_reason) col.meta.textContent = `${col.tokens.length} tokens, ${c.finish_reason}`;
        }
      }
    }
  }
}

// Mark flips and per-model summaries once the diff is in.
function annotate(cols, diff) {
  diff.models.forEach((m, mi) => {
    const col = cols[m];
    if (!col) return;
    col.tokens.forEach((t, i) => {
      const at = diff.tokens[i] && diff.tokens[i].models[mi];
      if (at && at.flip) {
        t.span.classList.add('flip');
        t.span.setAttribute('aria-label', t.span.getAttribute('aria-label') + ', top-1 differs from the base');
      }
    });
    const s = diff.summary[mi];
    if (mi > 0) {
      const first = s.first_flip == null ? 'no flip' : `first flip at token ${s.first_flip}`;
      col.meta.textContent = `${first}; ${s.flips} flips, mean KLD ${fmtK(s.mean_kld)}`;
    }
  });
  const base = cols[diff.models[0]];
  const same = base.tokens.length === diff.tokens.length && base.tokens.every((t, i) => t.text === diff.tokens[i].text);
  if (!same) {
    setStatus('Note: the base column sampled differently from the diff\'s base continuation; ' +
      'the outlines and the hover card follow the diff\'s continuation position by position.');
  }
}

function card(span) {
  const box = $('#card');
  const i = Number(span.dataset.i);
  box.innerHTML = '';
  const h = document.createElement('h3');
  const diff = state.diff;
  if (!diff || !diff.tokens[i]) {
    h.textContent = diff ? `token ${i}: beyond the base's continuation` : `token ${i}: waiting for /v1/diff…`;
    box.appendChild(h);
  } else {
    const pos = diff.tokens[i];
    h.textContent = `token ${i} — base ${diff.models[0]} chose "${show(pos.text)}"`;
    box.appendChild(h);
    const grid = document.createElement('div');
    grid.className = 'grid';
    diff.models.forEach((m, mi) => {
      const at = pos.models[mi];
      const d = document.createElement('div');
      d.className = 'fmt' + (at.flip ? ' flip' : '');
      const title = document.createElement('strong');
      title.textContent = m;
      const line = document.createElement('div');
      line.textContent = `KLD ${fmtK(at.kld)} · p(base token) ${fmtP(at.p)}${at.flip ? ' · flip' : ''}`;
      const ol = document.createElement('ol');
      for (const t of at.top) {
        const li = document.createElement('li');
        if (t.id === pos.id) li.className = 'base';
        const c = document.createElement('code');
        c.textContent = `"${show(t.text)}"`;
        li.append(c, ` ${fmtP(t.p)}`);
        ol.appendChild(li);
      }
      d.append(title, line, ol);
      grid.appendChild(d);
    });
    box.appendChild(grid);
  }
  box.hidden = false;
  const r = span.getBoundingClientRect();
  const left = Math.max(4, Math.min(window.scrollX + r.left, window.scrollX + document.documentElement.clientWidth - box.offsetWidth - 4));
  box.style.left = left + 'px';
  box.style.top = (window.scrollY + r.bottom + 6) + 'px';
  document.querySelectorAll('.tok.current').forEach((e) => e.classList.remove('current'));
  document.querySelectorAll(`.tok[data-i="${i}"]`).forEach((e) => e.classList.add('current'));
}

function hideCard() {
  $('#card').hidden = true;
  document.querySelectorAll('.tok.current').forEach((e) => e.classList.remove('current'));
}

async function compare(ev) {
  ev.preventDefault();
  clearError();
  hideCard();
  state.key = $('#api_key').value || state.key;
  if (state.key) sessionStorage.setItem('ggpt-key', state.key);
  const run = ++state.run;
  const prompt = $('#prompt').value;
  const base = $('#base').value || state.models[0];
  const order = [base, ...state.models.filter((m) => m !== base)];
  const settings = {
    prompt,
    max_tokens: Number($('#max_tokens').value),
    temperature: Number($('#temperature').value),
    seed: Number($('#seed').value),
  };
  state.diff = null;
  const cols = makeColumns(order, prompt);
  $('#legend').hidden = false;
  $('#go').disabled = true;
  setStatus(`Generating with ${order.length} formats…`);
  const failures = [];
  const streams = order.map((m) => stream(m, settings, cols[m], run).catch((e) => {
    failures.push(e);
    showError(e.message.startsWith(m) ? e.message : `${m}: ${e.message}`);
  }));
  const diff = api('/v1/diff', { ...settings, models: order })
    .then((r) => r.json())
    .then((d) => { if (run === state.run) state.diff = d; })
    .catch((e) => { failures.push(e); showError(`diff: ${e.message}`); });
  await Promise.all([...streams, diff]);
  if (run !== state.run) return;
  $('#go').disabled = false;
  if (state.diff) {
    annotate(cols, state.diff);
    if (!$('#status').textContent.startsWith('Note')) {
      setStatus(failures.length ? 'Done, with errors (above).' : 'Done. Hover or focus a token for every format\'s top-5.');
    }
    document.body.dataset.ready = 'true';
  } else {
    setStatus('Failed (see the error above).');
    document.body.dataset.ready = 'error';
  }
}

// Keyboard: arrows move between tokens of a column (roving tabindex), Escape hides the card.
function onKey(ev) {
  const t = ev.target;
  if (ev.key === 'Escape') { hideCard(); return; }
  if (!t.classList || !t.classList.contains('tok')) return;
  const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1, Home: -1e9, End: 1e9 }[ev.key];
  if (step === undefined) return;
  const toks = [...t.parentElement.querySelectorAll('.tok')];
  const i = toks.indexOf(t);
  const j = Math.max(0, Math.min(toks.length - 1, i + step));
  ev.preventDefault();
  t.tabIndex = -1;
  toks[j].tabIndex = 0;
  toks[j].focus();
}

function init() {
  $('#form').addEventListener('submit', compare);
  const cols = $('#columns');
  cols.addEventListener('mouseover', (e) => { if (e.target.classList.contains('tok')) card(e.target); });
  cols.addEventListener('focusin', (e) => { if (e.target.classList.contains('tok')) card(e.target); });
  cols.addEventListener('mouseleave', hideCard);
  document.addEventListener('keydown', onKey);
  loadModels()
    .then(loadReport)
    .catch((e) => showError(e.message))
    .finally(() => { document.body.dataset.loaded = 'true'; });
}

init();
