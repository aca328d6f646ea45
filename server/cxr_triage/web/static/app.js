// cxr-triage worklist page. Plain JavaScript, no dependencies, no build step.
//
// Safety rules kept throughout: every value that comes from a study (DICOM attributes, reasons,
// warnings, error messages) reaches the page through textContent, never innerHTML; the API key
// and the reader's name live in sessionStorage (this tab only) and nothing else is stored; the
// address bar never changes (no study UID in a URL the browser keeps).
'use strict';

const POLL_MS = 3000;
const MODELS_MS = 30000;
const KEY_STORE = 'cxr.key';
const READER_STORE = 'cxr.reader';
const TRIAGE = {
  critical: { shape: '▲', text: 'Critical', cls: 't-critical' },
  abnormal: { shape: '■', text: 'Abnormal', cls: 't-abnormal' },
  normal: { shape: '○', text: 'Normal', cls: 't-normal' },
  unscored: { shape: '✕', text: 'Unscored', cls: 't-unscored' },
  queued: { shape: '◌', text: 'Queued', cls: 't-queued' },
};
const PRIORITY_TEXT = { stat: 'STAT', urgent: 'Urgent', routine: 'Routine', backfill: 'Backfill' };

const state = {
  key: sessionStorage.getItem(KEY_STORE) || '',
  models: new Map(), // name -> /v1/models entry
  worklist: [], // rows of GET /v1/worklist, in its order
  fetchedAt: 0, // performance.now() of the worklist fetch (waiting times tick from it)
  lastOk: null, // Date of the last good fetch
  selected: null, // study UID selected in the list
  open: null, // the study shown on the right (see openStudy)
  drafts: new Map(), // study UID -> { calls: Map(label -> bool), free: [labels] }
  heatOn: true,
  opacity: 0.45,
  unmarkedAbsent: true,
  submitting: false,
  locked: false, // waiting for an API key
  uploads: [],
};

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------
// DOM helper: el('li', {class: 'x', text: value}, child...) — text only, never HTML.

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === 'class') node.className = value;
    else if (name === 'text') node.textContent = String(value);
    else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function kbd(...keys) {
  return keys.map((k) => el('kbd', { text: k }));
}

// ---------------------------------------------------------------------------------------------
// API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
  get text() {
    return `${this.message} (${this.code})`;
  }
}

function authHeaders(extra = {}) {
  const headers = { ...extra };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  return headers;
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    /* not JSON */
  }
  const error = (body && body.error) || {};
  return new ApiError(response.status, error.code || `http_${response.status}`,
    error.message || response.statusText || 'request failed');
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: authHeaders(options.headers),
    cache: 'no-store',
    credentials: 'omit',
    referrerPolicy: 'no-referrer',
  });
  if (response.status === 401) {
    askKey(state.key ? 'That key was refused. Enter a valid API key.' : '');
    throw await errorOf(response);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function getJSON(path) {
  return (await api(path)).json();
}

const studyPath = (uid) => `/v1/studies/${encodeURIComponent(uid)}`;

// ---------------------------------------------------------------------------------------------
// API key

function askKey(message) {
  state.locked = true;
  const dialog = $('key-dialog');
  const error = $('key-error');
  error.textContent = message;
  error.hidden = !message;
  if (!dialog.open) dialog.showModal();
  $('key-input').focus();
}

async function submitKey(event) {
  event.preventDefault();
  const candidate = $('key-input').value.trim();
  if (!candidate) return;
  const response = await fetch('/v1/models', {
    headers: { Authorization: `Bearer ${candidate}` }, cache: 'no-store', credentials: 'omit',
  }).catch(() => null);
  if (!response || response.status === 401) {
    $('key-error').textContent = response ? 'That key was refused.' : 'The service does not answer.';
    $('key-error').hidden = false;
    $('key-input').select();
    return;
  }
  state.key = candidate;
  sessionStorage.setItem(KEY_STORE, candidate);
  $('key-input').value = '';
  $('key-dialog').close();
  state.locked = false;
  $('key-forget').hidden = false;
  await refreshModels();
  await refreshWorklist();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORE);
  state.key = '';
  $('key-forget').hidden = true;
  closeStudy();
  state.worklist = [];
  renderWorklist();
  askKey('');
}

// ---------------------------------------------------------------------------------------------
// Models and the "not for clinical use" banner

async function refreshModels() {
  try {
    const body = await getJSON('/v1/models');
    state.models = new Map(body.models.map((m) => [m.name, m]));
    renderBanner();
    renderLabelChoices();
  } catch (err) {
    if (err.status !== 401) setConn(`Cannot read the models: ${err.message}`, true);
  }
}

function versionInfo(ref) {
  const model = ref && state.models.get(ref.name);
  const version = model && model.versions.find((v) => v.version === ref.version);
  return version || (ref ? { weights: ref.weights, data: null } : null);
}

function isSynthetic(info) {
  return Boolean(info && info.data && info.data.trim().toLowerCase().startsWith('synthetic'));
}

function notClinical(name, info) {
  if (!info) return null;
  if (info.weights === 'untrained') return `${name} is untrained: its scores are meaningless`;
  if (isSynthetic(info)) return `${name} was trained on synthetic phantoms, not patients`;
  return null;
}

function provenance(info) {
  if (!info) return 'unknown weights';
  const data = info.data ? ` · ${info.data}` : '';
  return `${info.weights} weights${data}`;
}

function renderBanner() {
  const problems = new Set();
  for (const model of state.models.values()) {
    for (const v of model.versions.filter((x) => x.serving)) {
      const problem = notClinical(`${model.name} v${v.version}`, v);
      if (problem) problems.add(problem);
    }
  }
  for (const row of state.worklist) {
    if (!row.model) continue;
    const problem = notClinical(`${row.model.name} v${row.model.version}`, versionInfo(row.model));
    if (problem) problems.add(problem);
  }
  const banner = $('banner');
  banner.replaceChildren();
  banner.hidden = problems.size === 0;
  if (problems.size) {
    banner.append(el('strong', { text: 'NOT FOR CLINICAL USE' }),
      el('span', { text: ` — ${[...problems].join('; ')}.` }));
  }
}

function allLabels() {
  const labels = new Set();
  for (const m of state.models.values()) m.labels.forEach((l) => labels.add(l));
  return [...labels].sort();
}

function defaultModel() {
  return [...state.models.values()].find((m) => m.default) || null;
}

function renderLabelChoices() {
  let list = $('all-labels');
  if (!list) {
    list = el('datalist', { id: 'all-labels' });
    document.body.append(list);
  }
  list.replaceChildren(...allLabels().map((l) => el('option', { value: l })));
}

// ---------------------------------------------------------------------------------------------
// Worklist

async function refreshWorklist() {
  if (state.locked) return;
  try {
    const body = await getJSON('/v1/worklist?limit=500');
    state.worklist = body.studies;
    state.fetchedAt = performance.now();
    state.lastOk = new Date();
    renderWorklist();
    renderBanner();
    setConn(null, false);
    followOpenStudy();
  } catch (err) {
    if (err.status !== 401) setConn(`Cannot reach the service (${err.message}); retrying`, true);
  }
}

function setConn(problem, offline) {
  const conn = $('conn');
  conn.classList.toggle('offline', offline);
  const when = state.lastOk ? state.lastOk.toLocaleTimeString() : 'never';
  conn.textContent = problem ? `${problem} — last update ${when}` : `Live · updated ${when}`;
}

function triageKey(row) {
  return row.status === 'scored' ? row.triage : row.status;
}

function badge(key) {
  const t = TRIAGE[key] || TRIAGE.queued;
  return el('span', { class: `triage ${t.cls}`, title: t.text },
    el('span', { class: 'shape', 'aria-hidden': 'true', text: t.shape }), ` ${t.text}`);
}

function priorityTag(priority) {
  return el('span', { class: `prio p-${priority}`, text: PRIORITY_TEXT[priority] || priority });
}

function waitingText(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n) => String(n).padStart(2, '0');
  return h ? `${h}h ${pad(m)}m ${pad(s % 60)}s` : `${m}m ${pad(s % 60)}s`;
}

function waitedNow(row) {
  return row.waiting_s + (performance.now() - state.fetchedAt) / 1000;
}

function findingsSummary(row) {
  if (row.status === 'unscored') {
    const error = row.error || {};
    return el('span', { class: 'row-error', text: `Not scored: ${error.message || 'scoring failed'}` });
  }
  if (row.status !== 'scored') return el('span', { class: 'muted', text: 'Waiting to be scored' });
  return el('span', { class: 'top-findings' }, row.top_findings.map((f) => {
    const positive = f.positive === true;
    const point = f.threshold === null ? 'no op' : `${positive ? '≥' : '<'} op ${f.threshold.toFixed(2)}`;
    return el('span', { class: positive ? 'tf positive' : 'tf' },
      el('span', { class: 'tf-mark', 'aria-hidden': 'true', text: positive ? '+' : '·' }),
      `${f.label}${f.unseen ? ' (zero-shot)' : ''} ${f.probability.toFixed(2)} ${point}`);
  }));
}

function modelLine(row) {
  if (!row.model) return el('span', { class: 'muted', text: 'model: not scored yet' });
  const info = versionInfo(row.model);
  const warn = notClinical('', info);
  return el('span', { class: 'model-line' },
    `${row.model.name} v${row.model.version} · ${provenance(info)}`,
    warn ? el('span', { class: 'nfc', text: ' · not for clinical use' }) : null);
}

const rowIds = new Map();

function rowId(uid) {
  if (!rowIds.has(uid)) rowIds.set(uid, `wl-row-${rowIds.size + 1}`);
  return rowIds.get(uid);
}

function buildRow(row, index) {
  const li = el('li', {
    role: 'option', id: rowId(row.study_uid), class: `row ${TRIAGE[triageKey(row)].cls}`,
  });
  li.dataset.uid = row.study_uid;
  li.append(
    el('span', { class: 'pos', text: index + 1 }),
    badge(triageKey(row)),
    priorityTag(row.priority),
    findingsSummary(row),
    el('span', { class: 'wait', title: 'time waiting' }, el('span', { 'aria-hidden': 'true', text: '◷ ' }),
      el('span', { class: 'wait-value', text: waitingText(waitedNow(row)) })),
    el('span', { class: 'reason', title: 'why it is here' }, row.reason),
    el('span', { class: 'meta' }, el('span', { class: 'uid', text: shortUid(row.study_uid), title: row.study_uid }),
      ' · ', modelLine(row)),
  );
  li.addEventListener('click', () => {
    select(row.study_uid);
    openStudy(row.study_uid);
  });
  return li;
}

function shortUid(uid) {
  return uid.length > 24 ? `…${uid.slice(-22)}` : uid;
}

function rowSignature(row, index) {
  const { waiting_s: _w, rank: _r, ...rest } = row;
  const model = row.model ? versionInfo(row.model) : null;
  return JSON.stringify([index, rest, model && model.data]);
}

function renderWorklist() {
  const list = $('worklist');
  const before = new Map([...list.children].map((li) => [li.dataset.uid, li]));
  const anchor = before.get(state.selected);
  const anchorOffset = anchor ? anchor.offsetTop - list.scrollTop : null;
  const uids = state.worklist.map((r) => r.study_uid);
  const rows = state.worklist.map((row, i) => {
    const signature = rowSignature(row, i);
    const old = before.get(row.study_uid);
    if (old && old.dataset.sig === signature) return old;
    const li = buildRow(row, i);
    li.dataset.sig = signature;
    if (!old && before.size) li.classList.add('arrived');
    return li;
  });
  // Move nodes only where the order changed: the list element itself (and its scroll) stays.
  rows.forEach((li, i) => {
    if (list.children[i] !== li) list.insertBefore(li, list.children[i] || null);
  });
  while (list.children.length > rows.length) list.lastElementChild.remove();
  $('wl-empty').hidden = rows.length > 0;
  $('wl-count').textContent = `${rows.length} waiting`;
  if (state.selected && !uids.includes(state.selected)) {
    const index = Math.min(state.lastSelectedIndex ?? 0, uids.length - 1);
    state.selected = index >= 0 ? uids[index] : null;
  }
  if (!state.selected && uids.length) state.selected = uids[0];
  // Keep the selected study where the reader sees it, whatever arrived above it.
  const kept = [...list.children].find((li) => li.dataset.uid === state.selected);
  if (kept && anchorOffset !== null) list.scrollTop = kept.offsetTop - anchorOffset;
  markSelected(false);
}

function markSelected(scroll) {
  const list = $('worklist');
  for (const li of list.children) {
    const on = li.dataset.uid === state.selected;
    li.setAttribute('aria-selected', on ? 'true' : 'false');
    li.classList.toggle('opened', Boolean(state.open && li.dataset.uid === state.open.uid));
    if (on) {
      list.setAttribute('aria-activedescendant', li.id);
      if (scroll) li.scrollIntoView({ block: 'nearest' });
    }
  }
  state.lastSelectedIndex = state.worklist.findIndex((r) => r.study_uid === state.selected);
}

function select(uid) {
  state.selected = uid;
  markSelected(true);
}

function move(step) {
  const uids = state.worklist.map((r) => r.study_uid);
  if (!uids.length) return;
  const at = uids.indexOf(state.selected);
  const next = at < 0 ? 0 : Math.max(0, Math.min(uids.length - 1, at + step));
  select(uids[next]);
}

function tickClocks() {
  const byUid = new Map(state.worklist.map((r) => [r.study_uid, r]));
  for (const li of $('worklist').children) {
    const row = byUid.get(li.dataset.uid);
    const value = li.querySelector('.wait-value');
    if (row && value) value.textContent = waitingText(waitedNow(row));
  }
  const openWait = document.querySelector('#study .study-wait');
  const row = state.open && byUid.get(state.open.uid);
  if (openWait && row) openWait.textContent = waitingText(waitedNow(row));
}

// ---------------------------------------------------------------------------------------------
// Study view

function draftOf(uid) {
  if (!state.drafts.has(uid)) state.drafts.set(uid, { calls: new Map(), free: [] });
  return state.drafts.get(uid);
}

async function openStudy(uid) {
  if (!uid) return;
  const seq = (state.openSeq || 0) + 1;
  state.openSeq = seq;
  releaseImages();
  state.open = { uid, study: null, images: null, imageIndex: 0, heatLabel: null, seq, blobs: new Map() };
  markSelected(false);
  renderStudyLoading(uid);
  await loadStudy(seq);
}

async function loadStudy(seq) {
  const open = state.open;
  try {
    const [study, images] = await Promise.all([
      getJSON(studyPath(open.uid)), getJSON(`${studyPath(open.uid)}/images`),
    ]);
    if (state.openSeq !== seq) return;
    open.study = study;
    open.images = images;
    open.rowState = rowState(open.uid);
    const findings = findingsOf(open);
    if (!open.heatLabel && findings.length && findings[0].probability !== null) open.heatLabel = findings[0].label;
    renderStudy();
  } catch (err) {
    if (state.openSeq === seq) renderStudyError(err);
  }
}

function rowState(uid) {
  const row = state.worklist.find((r) => r.study_uid === uid);
  return row ? JSON.stringify([row.status, row.place, row.reason.split(';')[0]]) : null;
}

// When the open study changes on the server (an image scored), reload it; the reader's marks stay.
function followOpenStudy() {
  const open = state.open;
  if (!open || !open.study || state.submitting) return;
  const now = rowState(open.uid);
  const notice = document.querySelector('#study .gone');
  if (notice) notice.hidden = now !== null;
  if (now !== null && now !== open.rowState) loadStudy(open.seq);
}

function closeStudy() {
  releaseImages();
  state.open = null;
  $('study').replaceChildren(el('p', { class: 'placeholder' },
    'Select a study with ', ...kbd('j'), '/', ...kbd('k'), ' and press ', ...kbd('Enter'), '.'));
  markSelected(false);
}

function renderStudyLoading(uid) {
  $('study').replaceChildren(el('p', { class: 'placeholder', text: `Loading study ${shortUid(uid)}…` }));
}

function renderStudyError(err) {
  $('study').replaceChildren(el('p', { class: 'error', role: 'alert', text: `Cannot open this study: ${err.text}` }));
}

// Findings to show: the study result's, most suspicious first (probability over operating point);
// for a study not scored, the default model's labels without numbers (the reader can still report).
function findingsOf(open) {
  const result = open.study && open.study.result;
  if (result) {
    return [...result.findings].sort((a, b) => strength(b) - strength(a));
  }
  const model = defaultModel();
  return (model ? model.labels : []).map((label) => ({
    label, probability: null, threshold: null, positive: false,
    critical: model.critical_findings.includes(label),
  }));
}

function renderStudy() {
  const open = state.open;
  const { study, images } = open;
  const row = state.worklist.find((r) => r.study_uid === open.uid);
  const result = study.result;
  const key = result ? result.triage : (study.status === 'failed' ? 'unscored' : 'queued');
  const head = el('div', { class: 'study-head' },
    el('div', { class: 'badges' }, badge(key), priorityTag(study.priority),
      el('span', { class: 'status', text: `status: ${study.status}` }),
      row ? el('span', { class: 'wait', title: 'time waiting' }, '◷ waiting ', el('span', { class: 'study-wait', text: waitingText(waitedNow(row)) }))
        : null),
    el('h2', { class: 'study-title' }, 'Study ', el('code', { class: 'study-uid', text: study.study_uid })),
    el('p', { class: 'gone notice', hidden: Boolean(row),
      text: 'This study is no longer on the worklist (reported, perhaps by another reader).' }),
    study.report ? el('p', { class: 'notice',
      text: `Already reported by ${study.report.reader} at ${study.report.reported_at}; a new report amends it.` }) : null,
    metaList(open, row),
    dicomList(open),
    warningsList(images));
  const body = el('div', { class: 'study-body' }, viewer(open), findingsPanel(open));
  $('study').replaceChildren(head, body);
  showImages();
  updateMarks();
}

function metaList(open, row) {
  const { study, images } = open;
  const result = study.result;
  const dl = el('dl', { class: 'meta-list' });
  const add = (term, ...value) => dl.append(el('dt', { text: term }), el('dd', {}, ...value));
  if (row) add('Why here', row.reason);
  if (result) {
    const info = versionInfo(result.model);
    const warn = notClinical('this model', info);
    add('Model', `${result.model.name} v${result.model.version} (${result.model.backend})`);
    add('Weights', provenance(info), warn ? el('strong', { class: 'nfc', text: ` — not for clinical use: ${warn}` }) : null);
    add('Score', `abnormality ${result.abnormality_score.toFixed(2)} (≥ 0.50 when a finding passes its operating point)`);
  }
  add('Report to PACS', srText(images.sr));
  return dl;
}

// Descriptive DICOM attributes of the image shown (never patient identifiers: the API sends none).
function dicomList(open) {
  const image = open.images.images[open.imageIndex];
  if (!image || !Object.keys(image.dicom).length) return null;
  return el('dl', { class: 'dicom-list', 'aria-label': 'DICOM attributes' },
    Object.entries(image.dicom).map(([name, value]) => el('div', {},
      el('dt', { text: name.replace(/([a-z])([A-Z])/g, '$1 $2') }), el('dd', { text: value }))));
}

function srText(sr) {
  return {
    off: 'off (no PACS configured)',
    none: 'none (not DICOM, or nothing scored)',
    pending: 'DICOM SR waiting to be stored',
    stored: 'DICOM SR stored in the PACS',
    failed: 'DICOM SR could not be stored; see the server log',
  }[sr] || sr;
}

function warningsList(images) {
  const items = [];
  for (const [i, image] of images.images.entries()) {
    const where = images.images.length > 1 ? `image ${i + 1}: ` : '';
    for (const w of image.warnings) items.push(el('li', { text: where + w }));
    if (image.error) items.push(el('li', { class: 'error', text: `${where}not scored: ${image.error.message} (${image.error.code})` }));
  }
  return items.length ? el('ul', { class: 'warnings', 'aria-label': 'Warnings' }, items) : null;
}

function viewer(open) {
  const images = open.images.images;
  const thumbs = images.length > 1 ? el('div', { class: 'thumbs', role: 'tablist', 'aria-label': 'Images' },
    images.map((image, i) => el('button', {
      type: 'button', role: 'tab', class: 'thumb', 'aria-selected': i === open.imageIndex ? 'true' : 'false',
      onclick: () => { open.imageIndex = i; renderStudy(); },
      text: `Image ${i + 1}${image.dicom.ViewPosition ? ` (${image.dicom.ViewPosition})` : ''} · ${image.status}`,
    }))) : null;
  const figure = el('figure', { class: 'viewer' },
    el('div', { class: 'frame' },
      el('img', { id: 'preview', class: 'preview', alt: 'Radiograph as the model saw it' }),
      el('img', { id: 'heat', class: 'heat', alt: '', hidden: true })),
    el('figcaption', { id: 'viewer-caption', class: 'muted' }));
  const labels = (images[open.imageIndex] || {}).heatmap_labels || [];
  const controls = el('div', { class: 'heat-controls' },
    el('label', {}, el('input', {
      id: 'heat-toggle', type: 'checkbox', checked: state.heatOn, disabled: !labels.length,
      onchange: (e) => { state.heatOn = e.target.checked; showHeat(); },
    }), ' Heatmap ', ...kbd('h')),
    el('label', {}, 'of ', el('select', {
      id: 'heat-label', disabled: !labels.length,
      onchange: (e) => { open.heatLabel = e.target.value; showHeat(); updateMarks(); },
    }, labels.map((l) => el('option', { value: l, text: l })))),
    el('label', {}, 'opacity ', el('input', {
      id: 'heat-opacity', type: 'range', min: '0', max: '1', step: '0.05', value: String(state.opacity),
      disabled: !labels.length,
      oninput: (e) => { state.opacity = Number(e.target.value); showHeat(); },
    })),
    el('span', { class: 'legend muted', text: labels.length
      ? 'red → yellow: where the model looked for this finding (relative, not a probability)'
      : 'no heatmap for this image' }));
  return el('div', { class: 'viewer-col' }, thumbs, figure, controls);
}

function findingsPanel(open) {
  const findings = findingsOf(open);
  const list = el('ol', { class: 'findings', 'aria-label': 'Findings' },
    findings.map((f, i) => findingRow(open, f, i)));
  const free = el('div', { class: 'free' },
    el('label', { for: 'free-input' }, 'Add a finding not listed'),
    el('div', { class: 'free-row' },
      el('input', { id: 'free-input', type: 'text', list: 'all-labels', autocomplete: 'off', spellcheck: 'false',
        placeholder: 'label, e.g. Pneumothorax',
        onkeydown: (e) => { if (e.key === 'Enter' && !e.ctrlKey && !e.metaKey) { e.preventDefault(); addFree(); } } }),
      el('button', { type: 'button', onclick: addFree, text: 'Add as present' })),
    el('ul', { id: 'free-list', class: 'free-list' }));
  const submit = el('div', { class: 'submit-box' },
    el('label', {}, el('input', {
      id: 'unmarked-absent', type: 'checkbox', checked: state.unmarkedAbsent,
      onchange: (e) => { state.unmarkedAbsent = e.target.checked; updateMarks(); },
    }), ' Findings I leave unmarked are sent as absent'),
    el('p', { id: 'submit-summary', class: 'muted' }),
    el('p', { id: 'submit-error', class: 'error', role: 'alert', hidden: true }),
    el('button', { id: 'submit-report', type: 'button', class: 'primary', onclick: submitReport },
      'Submit report ', ...kbd('Ctrl', 'Enter')));
  return el('div', { class: 'findings-col' },
    el('h3', {}, 'Findings ', el('span', { class: 'muted small', text: 'bar: probability · tick: operating point' })),
    list, free, submit);
}

// How far a finding is toward its operating point (the server's triage.scoring.margin); a
// finding without one (zero-shot, added at run time) sorts after every called finding.
function strength(f) {
  if (f.threshold === null || f.probability === null) return 0;
  const p = f.probability, t = f.threshold;
  return p < t ? 0.5 * p / t : 0.5 + 0.5 * (p - t) / (1 - t);
}

function findingRow(open, f, index) {
  const digit = index < 9 ? String(index + 1) : index === 9 ? '0' : '';
  const scored = f.probability !== null;
  const hasOp = scored && f.threshold !== null;
  const bar = el('div', {
    class: 'bar', role: 'img',
    'aria-label': !scored ? 'not scored' : hasOp
      ? `probability ${f.probability.toFixed(2)}, operating point ${f.threshold.toFixed(2)}`
      : `score ${f.probability.toFixed(2)}, no operating point`,
  }, el('div', { class: 'bar-fill' }), el('div', { class: 'bar-op' }));
  if (scored) bar.firstChild.style.width = `${(f.probability * 100).toFixed(1)}%`;
  if (hasOp) {
    bar.lastChild.style.left = `${(f.threshold * 100).toFixed(1)}%`;
  } else {
    bar.lastChild.hidden = true;
  }
  const li = el('li', { class: `finding${f.positive ? ' positive' : ''}` },
    el('span', { class: 'f-key', text: digit, title: digit ? `key ${digit}` : '' }),
    el('button', { type: 'button', class: 'f-name', title: 'Show the heatmap of this finding',
      onclick: () => { open.heatLabel = f.label; showHeat(); updateMarks(); } },
    f.label, f.critical ? el('span', { class: 'crit', title: 'critical finding', text: ' ◆' }) : null,
    f.unseen ? el('span', { class: 'zero-shot', title: 'zero-shot: the model was never trained on this finding', text: ' zero-shot' }) : null),
    bar,
    el('span', { class: 'f-num', text: !scored ? '—' : hasOp ? `${f.probability.toFixed(2)} / op ${f.threshold.toFixed(2)}` : `${f.probability.toFixed(2)} / no op` }),
    el('span', { class: 'f-call', text: !scored ? '' : !hasOp ? 'not called' : f.positive ? '▲ above op' : 'below op' }),
    el('span', { class: 'f-reader', role: 'group', 'aria-label': `Your call on ${f.label}` },
      el('button', { type: 'button', class: 'mark present', 'aria-pressed': 'false',
        'aria-label': `Confirm ${f.label} present`, onclick: () => setCall(f.label, true) }, '✓ Present'),
      el('button', { type: 'button', class: 'mark absent', 'aria-pressed': 'false',
        'aria-label': `Reject ${f.label} (absent)`, onclick: () => setCall(f.label, false) }, '✗ Absent')));
  li.dataset.label = f.label;
  return li;
}

function setCall(label, value) {
  const calls = draftOf(state.open.uid).calls;
  if (calls.get(label) === value) calls.delete(label);
  else calls.set(label, value);
  updateMarks();
}

function cycleCall(index) {
  if (!state.open || !state.open.study) return;
  const finding = findingsOf(state.open)[index];
  if (!finding) return;
  const calls = draftOf(state.open.uid).calls;
  const now = calls.get(finding.label);
  if (now === undefined) calls.set(finding.label, true);
  else if (now === true) calls.set(finding.label, false);
  else calls.delete(finding.label);
  updateMarks();
}

function addFree() {
  const input = $('free-input');
  const label = input.value.trim();
  if (!label) return;
  const draft = draftOf(state.open.uid);
  const listed = findingsOf(state.open).some((f) => f.label === label);
  if (!listed && !draft.free.includes(label)) draft.free.push(label);
  draft.calls.set(label, true);
  input.value = '';
  updateMarks();
}

function updateMarks() {
  const open = state.open;
  if (!open || !open.study) return;
  const draft = draftOf(open.uid);
  for (const li of document.querySelectorAll('#study .finding')) {
    const call = draft.calls.get(li.dataset.label);
    li.querySelector('.present').setAttribute('aria-pressed', call === true ? 'true' : 'false');
    li.querySelector('.absent').setAttribute('aria-pressed', call === false ? 'true' : 'false');
    li.classList.toggle('marked-present', call === true);
    li.classList.toggle('marked-absent', call === false);
    li.classList.toggle('heat-selected', li.dataset.label === open.heatLabel);
  }
  const freeList = $('free-list');
  if (freeList) {
    freeList.replaceChildren(...draft.free.map((label) => {
      const call = draft.calls.get(label);
      return el('li', { class: 'chip' }, el('span', { text: label }),
        el('button', { type: 'button', 'aria-pressed': call === true ? 'true' : 'false', class: 'mark present',
          onclick: () => setCall(label, true), text: '✓ Present' }),
        el('button', { type: 'button', 'aria-pressed': call === false ? 'true' : 'false', class: 'mark absent',
          onclick: () => setCall(label, false), text: '✗ Absent' }),
        el('button', { type: 'button', class: 'remove', 'aria-label': `Remove ${label}`, text: '×',
          onclick: () => { draft.free = draft.free.filter((l) => l !== label); draft.calls.delete(label); updateMarks(); } }));
    }));
  }
  const labels = reportLabels();
  const present = Object.values(labels).filter((v) => v).length;
  const summary = $('submit-summary');
  if (summary) {
    const total = Object.keys(labels).length;
    summary.textContent = total ? `The report will say: ${present} present, ${total - present} absent.`
      : 'Mark at least one finding to report.';
  }
  const select = $('heat-label');
  if (select && open.heatLabel) select.value = open.heatLabel;
}

function reportLabels() {
  const open = state.open;
  const draft = draftOf(open.uid);
  const labels = {};
  for (const f of findingsOf(open)) {
    if (draft.calls.has(f.label)) labels[f.label] = draft.calls.get(f.label);
    else if (state.unmarkedAbsent) labels[f.label] = false;
  }
  for (const label of draft.free) if (draft.calls.has(label)) labels[label] = draft.calls.get(label);
  return labels;
}

async function submitReport() {
  const open = state.open;
  if (!open || !open.study || state.submitting) return;
  const error = $('submit-error');
  const reader = $('reader').value.trim();
  const fail = (text) => { error.textContent = text; error.hidden = false; };
  if (!reader) {
    fail('Enter your name in "Reader" (top right) first: every report says who read it.');
    $('reader').focus();
    return;
  }
  const labels = reportLabels();
  if (!Object.keys(labels).length) return fail('Mark at least one finding, or send unmarked findings as absent.');
  state.submitting = true;
  $('submit-report').disabled = true;
  try {
    await api(`${studyPath(open.uid)}/report`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ labels, reader }),
    });
  } catch (err) {
    state.submitting = false;
    $('submit-report').disabled = false;
    return fail(`The report was not stored: ${err.text}`);
  }
  const present = Object.values(labels).filter((v) => v).length;
  toast(`Report stored for study ${shortUid(open.uid)}: ${present} present, ${Object.keys(labels).length - present} absent.`);
  state.drafts.delete(open.uid);
  const index = state.worklist.findIndex((r) => r.study_uid === open.uid);
  state.worklist = state.worklist.filter((r) => r.study_uid !== open.uid);
  state.submitting = false;
  const next = state.worklist[Math.max(0, Math.min(index, state.worklist.length - 1))];
  state.selected = next ? next.study_uid : null;
  renderWorklist();
  if (next) openStudy(next.study_uid);
  else closeStudy();
  refreshWorklist();
}

// ---------------------------------------------------------------------------------------------
// Images: fetched with the key, shown as blob URLs (an <img src> cannot send a bearer token)

function releaseImages() {
  const open = state.open;
  if (!open) return;
  for (const url of open.blobs.values()) URL.revokeObjectURL(url);
  open.blobs.clear();
}

async function blobUrl(open, url) {
  if (open.blobs.has(url)) return open.blobs.get(url);
  const response = await api(url);
  const objectUrl = URL.createObjectURL(await response.blob());
  if (state.open === open) open.blobs.set(url, objectUrl);
  return objectUrl;
}

async function showImages() {
  const open = state.open;
  const image = open.images.images[open.imageIndex];
  const caption = $('viewer-caption');
  const preview = $('preview');
  if (!image || !image.preview_url) {
    preview.hidden = true;
    caption.textContent = image && image.error ? `No image: not scored (${image.error.message}).`
      : 'No image is kept for this instance.';
    return;
  }
  try {
    const url = await blobUrl(open, image.preview_url);
    if (state.open !== open) return;
    preview.src = url;
    preview.addEventListener('load', () => {
      caption.textContent = `The image as the model saw it: ${preview.naturalWidth}×${preview.naturalHeight} px, `
        + 'windowed, MONOCHROME1 inverted, letterboxed to the model input.';
    }, { once: true });
  } catch (err) {
    caption.textContent = `No preview: ${err.text}`;
  }
  showHeat();
}

async function showHeat() {
  const open = state.open;
  const heat = $('heat');
  if (!open || !heat) return;
  const image = open.images.images[open.imageIndex];
  const wanted = state.heatOn && image && image.heatmap_url && image.heatmap_labels.includes(open.heatLabel);
  const toggle = $('heat-toggle');
  if (toggle) toggle.checked = state.heatOn;
  if (!wanted) {
    heat.hidden = true;
    heat.removeAttribute('data-label');
    return;
  }
  const label = open.heatLabel;
  try {
    const url = await blobUrl(open, image.heatmap_url.replace('{label}', encodeURIComponent(label)));
    if (state.open !== open || open.heatLabel !== label || !state.heatOn) return;
    heat.src = url;
    heat.dataset.label = label;
    heat.style.opacity = String(state.opacity);
    heat.alt = `Heatmap of ${label}`;
    heat.hidden = false;
  } catch (err) {
    heat.hidden = true;
    $('viewer-caption').textContent = `No heatmap: ${err.text}`;
  }
}

function stepHeat(step) {
  const open = state.open;
  if (!open || !open.study) return;
  const labels = findingsOf(open).map((f) => f.label);
  if (!labels.length) return;
  const at = labels.indexOf(open.heatLabel);
  open.heatLabel = labels[(at + step + labels.length) % labels.length];
  state.heatOn = true;
  showHeat();
  updateMarks();
}

// ---------------------------------------------------------------------------------------------
// Upload

function openUpload(files) {
  const dialog = $('upload-dialog');
  if (!dialog.open) dialog.showModal();
  if (files && files.length) addFiles(files);
}

function addFiles(files) {
  const fresh = state.uploads.every((u) => u.state !== 'ready');
  if (fresh) state.uploads = state.uploads.filter((u) => u.state === 'ready');
  for (const file of files) state.uploads.push({ file, state: 'ready', progress: 0, message: '' });
  renderUploads();
}

function renderUploads() {
  $('upload-list').replaceChildren(...state.uploads.map((u) => {
    const progress = el('progress', { max: '1', value: String(u.progress) });
    return el('li', { class: `upload ${u.state}` },
      el('span', { class: 'up-name', text: u.file.name }),
      el('span', { class: 'muted', text: ` ${(u.file.size / 1024).toFixed(0)} KiB ` }),
      progress,
      el('span', { class: 'up-state', text: u.message || u.state }));
  }));
  $('upload-submit').disabled = !state.uploads.some((u) => u.state === 'ready');
}

async function mediaType(file) {
  const head = new Uint8Array(await file.slice(0, 132).arrayBuffer());
  const starts = (...bytes) => bytes.every((b, i) => head[i] === b);
  if (starts(0x89, 0x50, 0x4e, 0x47)) return 'image/png';
  if (starts(0xff, 0xd8, 0xff)) return 'image/jpeg';
  if (String.fromCharCode(...head.slice(128, 132)) === 'DICM') return 'application/dicom';
  const name = file.name.toLowerCase();
  if (name.endsWith('.png')) return 'image/png';
  if (name.endsWith('.jpg') || name.endsWith('.jpeg')) return 'image/jpeg';
  if (name.endsWith('.dcm') || name.endsWith('.dicom')) return 'application/dicom';
  return file.type || 'application/octet-stream';
}

// A new study UID for PNG/JPEG files uploaded together: 2.25 + a random 128-bit number (PS3.5 B.2).
function newUid() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  const hex = [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('');
  return `2.25.${BigInt(`0x${hex}`).toString()}`;
}

function send(url, file, type, onProgress) {
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', url);
    xhr.setRequestHeader('Content-Type', type);
    if (state.key) xhr.setRequestHeader('Authorization', `Bearer ${state.key}`);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      resolve({ status: xhr.status, body });
    };
    xhr.onerror = () => resolve({ status: 0, body: null });
    xhr.send(file);
  });
}

async function submitUploads(event) {
  event.preventDefault();
  const batch = state.uploads.filter((u) => u.state === 'ready');
  if (!batch.length) return;
  $('upload-submit').disabled = true;
  const priority = $('upload-priority').value;
  const studyUid = newUid();
  let queued = 0;
  for (const upload of batch) {
    upload.state = 'sending';
    renderUploads();
    const type = await mediaType(upload.file);
    const params = new URLSearchParams();
    if (priority) params.set('priority', priority);
    if (type !== 'application/dicom') params.set('study_uid', studyUid);
    const { status, body } = await send(`/v1/studies?${params}`, upload.file, type, (p) => {
      upload.progress = p;
      renderUploads();
    });
    upload.progress = 1;
    if (status === 202) {
      upload.state = 'queued';
      upload.message = body.duplicate ? 'already received (not scored twice)' : `queued (${PRIORITY_TEXT[body.priority]})`;
      queued += 1;
    } else {
      const error = (body && body.error) || {};
      upload.state = 'failed';
      upload.message = status === 0 ? 'the service did not answer' : `${error.message || 'refused'} (${error.code || status})`;
      if (status === 401) askKey('That key was refused. Enter a valid API key.');
    }
    renderUploads();
  }
  if (queued) toast(`${queued} image${queued > 1 ? 's' : ''} queued for scoring.`);
  refreshWorklist();
}

// ---------------------------------------------------------------------------------------------
// Help, toast, keyboard

function toast(text) {
  const box = $('toast');
  box.textContent = text;
  box.hidden = false;
  clearTimeout(state.toastTimer);
  state.toastTimer = setTimeout(() => { box.hidden = true; }, 5000);
}

function isTyping(target) {
  return Boolean(target && target.matches
    && target.matches('textarea, select, input:not([type=checkbox]):not([type=range]):not([type=radio])'));
}

function onKey(event) {
  if ((event.ctrlKey || event.metaKey) && event.key === 'Enter') {
    if (!document.querySelector('dialog[open]')) {
      event.preventDefault();
      submitReport();
    }
    return;
  }
  if (document.querySelector('dialog[open]') || isTyping(event.target)) return;
  if (event.altKey || event.ctrlKey || event.metaKey) return;
  const key = event.key;
  const actions = {
    j: () => move(1), ArrowDown: () => move(1), k: () => move(-1), ArrowUp: () => move(-1),
    Enter: () => openStudy(state.selected),
    h: () => { state.heatOn = !state.heatOn; showHeat(); },
    '[': () => stepHeat(-1), ']': () => stepHeat(1),
    u: () => openUpload(), r: () => refreshWorklist(), '?': () => $('help-dialog').showModal(),
  };
  if (key === 'Enter' && event.target.closest('button, a, summary')) return;
  if (/^[0-9]$/.test(key)) {
    event.preventDefault();
    cycleCall(key === '0' ? 9 : Number(key) - 1);
  } else if (actions[key]) {
    event.preventDefault();
    actions[key]();
  }
}

// ---------------------------------------------------------------------------------------------
// Start

function wire() {
  $('key-form').addEventListener('submit', submitKey);
  $('key-dialog').addEventListener('cancel', (e) => e.preventDefault()); // nothing works without a key
  $('key-forget').addEventListener('click', forgetKey);
  $('key-forget').hidden = !state.key;
  $('help-open').addEventListener('click', () => $('help-dialog').showModal());
  $('help-close').addEventListener('click', () => $('help-dialog').close());
  $('upload-open').addEventListener('click', () => openUpload());
  $('upload-close').addEventListener('click', () => $('upload-dialog').close());
  $('upload-form').addEventListener('submit', submitUploads);
  $('file-input').addEventListener('change', (e) => { addFiles(e.target.files); e.target.value = ''; });
  const zone = $('drop-zone');
  zone.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') $('file-input').click(); });
  document.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
  document.addEventListener('dragleave', () => zone.classList.remove('over'));
  document.addEventListener('drop', (e) => {
    e.preventDefault();
    zone.classList.remove('over');
    if (e.dataTransfer && e.dataTransfer.files.length) openUpload(e.dataTransfer.files);
  });
  const reader = $('reader');
  reader.value = sessionStorage.getItem(READER_STORE) || '';
  reader.addEventListener('change', () => sessionStorage.setItem(READER_STORE, reader.value.trim()));
  document.addEventListener('keydown', onKey);
}

async function poll() {
  await refreshWorklist();
  setTimeout(poll, POLL_MS);
}

async function start() {
  wire();
  await refreshModels();
  poll();
  setInterval(refreshModels, MODELS_MS);
  setInterval(tickClocks, 1000);
}

start();
