// The web page: log in, classify dropped or chosen images, edit the session's options, browse the
// history. Plain DOM code on top of the JavaScript client; no framework, no inline script or style.
import {
  AuthError, Client, ConnectionFailed, NotFoundError, PayloadTooLarge, RateLimited, ServerBusy, ServerError,
  UnsupportedMediaType, ValidationError, defaultModel,
} from "/static/client/client.js";

const TOKEN_KEY = "inference.token";
const SESSION_KEY = "inference.session";
const API_KEY_KEY = "inference.apiKey";  // the tab's API key, where the server wants one
const THUMB_PREFIX = "inference.thumb.";
// The last results, kept for a reload: each card's data (file name, model, labels, scores, options, timing,
// correction), not the image; a restored card shows the history thumbnail (96 px) in its place.
const RESULTS_PREFIX = "inference.results.";
const KEPT_RESULTS = 12;
const HISTORY_PAGE = 10;
const UPLOAD_CONCURRENCY = 2;
const THUMB_SIZE = 96;
const OPTION_FIELDS = ["top_k", "resize", "crop", "interpolation", "color"];
const NUMBER_FIELDS = new Set(["top_k", "resize", "crop"]);
const LABEL_SUGGESTIONS = 8;
const TOUCH = window.matchMedia("(hover: none) and (pointer: coarse)");

const $ = (id) => document.getElementById(id);
const els = {
  sessionForm: $("session"), status: $("session-status"), login: $("login"),
  apiKeyField: $("api-key-field"), apiKey: $("api-key"), logout: $("logout"), erase: $("erase"), alert: $("alert"),
  dropzone: $("dropzone"), dropHint: $("dropzone-hint"), fileInput: $("file-input"),
  results: $("results"), resultsEmpty: $("results-empty"),
  form: $("options-form"), fieldset: $("options-fieldset"), formError: $("options-error"),
  modelField: $("model-field"), model: $("opt-model"),
  formStatus: $("options-status"), save: $("options-save"),
  history: $("history"), historyEmpty: $("history-empty"), historyError: $("history-error"),
  historyMore: $("history-more"), historyCount: $("history-count"),
};

const client = new Client("", { token: sessionStorage.getItem(TOKEN_KEY) });
const state = {
  sessionId: sessionStorage.getItem(SESSION_KEY), options: null, cursor: null, predictions: 0,
  models: [], defaultModel: null,  // GET /v1/models, read once per login
};
const objectUrls = [];
// Per model name, class index -> label: the model's whole list (GET /v1/models/<name>/labels, fetched
// when a correction of one of its predictions first opens, and for the session's model after login),
// and until it arrives (or if it cannot) every label of it the server has named on this page. The
// correction search offers the prediction's own model's; a name or class number typed in full is
// resolved by the server itself.
const knownLabels = new Map();
// "name@version" -> the promise of that model's list: each model's labels are fetched once per version.
const labelRequests = new Map();
let controlCount = 0;

// -- small helpers -------------------------------------------------------------------------------

function clone(templateId) {
  return $(templateId).content.firstElementChild.cloneNode(true);
}

function percent(score) {
  return `${(score * 100).toFixed(1)}%`;
}

function timeOf(iso) {
  const date = new Date(iso);
  const sameDay = date.toDateString() === new Date().toDateString();
  const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return sameDay ? time : `${date.toLocaleDateString()} ${time}`;
}

function showAlert(message) {
  els.alert.textContent = message;
  els.alert.hidden = !message;
}

/** The name of the model that made a prediction (older kept cards have none: the default's). */
function modelOf(item) {
  return item.model?.name ?? state.defaultModel ?? "";
}

/** Whether the server serves more than one model: only then do the page's cards name theirs. */
function severalModels() {
  return state.models.length > 1;
}

/** An error in words for a person: what happened and what to do, never a raw code. The server's
 * own messages for a refused request (a bad option, an unknown label) are already sentences. */
function describe(error) {
  if (error instanceof ConnectionFailed) {
    return error.code === "timeout"
      ? "The server took too long to answer. Try again in a moment."
      : "The server cannot be reached. Check your connection, or whether the server is running, and try again.";
  }
  if (error instanceof UnsupportedMediaType || error?.code === "invalid_image") {
    return "This file is not an image the server can read (JPEG, PNG, WebP, GIF or BMP).";
  }
  if (error instanceof PayloadTooLarge) return "This file is too large for the server.";
  if (error instanceof RateLimited) {
    return error.retryAfter ? `Too many requests: wait ${Math.ceil(error.retryAfter)} s and try again.`
      : "Too many requests: wait a moment and try again.";
  }
  if (error instanceof ServerBusy) return "The server is busy. Try again in a moment.";
  if (error instanceof ServerError) return "The server ran into a problem. Try again; if it persists, tell its operator.";
  return error?.message || String(error);
}

// -- session -------------------------------------------------------------------------------------

function setLoggedIn(session) {
  const loggedIn = Boolean(session);
  els.login.hidden = loggedIn;
  els.logout.hidden = !loggedIn;
  els.erase.hidden = !loggedIn;
  if (loggedIn) els.apiKeyField.hidden = true;
  els.fileInput.disabled = !loggedIn;
  els.dropzone.classList.toggle("disabled", !loggedIn);
  els.fieldset.disabled = !loggedIn;
  els.dropHint.textContent = loggedIn
    ? "JPEG, PNG, WebP, GIF or BMP \u00b7 several at once"
    : "JPEG, PNG, WebP, GIF or BMP \u00b7 log in first";
  if (loggedIn) {
    const expires = new Date(session.expires_at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    els.status.textContent = `Session ${session.session_id.slice(0, 8)} \u00b7 expires ${expires}`;
    els.status.title = `Session ${session.session_id}`;
  } else {
    els.status.textContent = "Not logged in";
    els.status.removeAttribute("title");
  }
}

function forgetSession() {
  if (state.sessionId) sessionStorage.removeItem(resultsKey());
  client.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(SESSION_KEY);
  state.sessionId = null;
  state.options = null;
  state.cursor = null;
  state.models = [];
  els.modelField.hidden = true;
  setLoggedIn(null);
  renderHistory([], { reset: true });
  setCount(0);
}

/** A request failed because the session is gone: say so and go back to the logged-out state. */
function handleAuthError(error) {
  if (!(error instanceof AuthError)) return false;
  const known = { session_revoked: "You were logged out of this session", token_expired: "Your session expired",
    session_not_found: "Your session expired" };
  showAlert(`${known[error.code] ?? "Your session is no longer valid"}. Log in again to go on.`);
  for (const key of thumbKeys()) sessionStorage.removeItem(key);
  forgetSession();
  return true;
}

const API_KEY_REFUSALS = {
  missing_api_key: "This server asks for an API key. Enter it and log in.",
  invalid_api_key: "That API key is not valid. Check it and log in again.",
};

async function login(event) {
  event?.preventDefault();
  els.login.disabled = true;
  showAlert("");
  const apiKey = els.apiKey.value.trim() || sessionStorage.getItem(API_KEY_KEY) || undefined;
  try {
    const result = await client.login({ apiKey });
    if (apiKey) sessionStorage.setItem(API_KEY_KEY, apiKey);
    els.apiKey.value = "";
    sessionStorage.setItem(TOKEN_KEY, result.token);
    sessionStorage.setItem(SESSION_KEY, result.session_id);
    state.sessionId = result.session_id;
    await enterSession(await client.session());
  } catch (error) {
    if (error instanceof AuthError && error.code in API_KEY_REFUSALS) {
      sessionStorage.removeItem(API_KEY_KEY);
      els.apiKeyField.hidden = false;
      els.apiKey.setAttribute("aria-invalid", String(error.code === "invalid_api_key"));
      showAlert(API_KEY_REFUSALS[error.code]);
      els.apiKey.focus();
      els.apiKey.select();
    } else {
      showAlert(`Could not log in: ${describe(error)}`);
    }
  } finally {
    els.login.disabled = false;
  }
}

/** Log out; with `erase`, the server also erases the session's history, corrections and images. */
async function logout({ erase = false } = {}) {
  if (erase && !window.confirm("Erase this session's history, corrections and stored images, and log out?")) return;
  els.logout.disabled = els.erase.disabled = true;
  try {
    await client.logout({ erase });
  } catch (error) {
    if (!(error instanceof AuthError)) {
      showAlert(`Could not log out: ${describe(error)}`);
      els.logout.disabled = els.erase.disabled = false;
      return;
    }
  }
  for (const key of thumbKeys()) sessionStorage.removeItem(key);
  forgetSession();
  clearResults();
  showAlert("");
  els.logout.disabled = els.erase.disabled = false;
}

async function enterSession(session) {
  state.sessionId = session.session_id;
  sessionStorage.setItem(SESSION_KEY, session.session_id);
  setLoggedIn(session);
  await loadModels();  // first: the cards and history name their model where several are served
  fillOptions(session.options);
  setCount(session.predictions);
  if (!els.results.querySelector(".result")) restoreResults();
  const model = session.options.model ?? state.defaultModel;
  const active = state.models.find((each) => each.name === model);
  if (active) loadLabels({ name: model, version: active.serving_version ?? active.active_version });  // in the background
  await loadHistory({ reset: true });
}

/** The served models, for the selector (shown only where there are several); the page works without. */
async function loadModels() {
  try {
    const listing = await client.models();
    state.models = listing.models ?? [];
    state.defaultModel = defaultModel(listing);
  } catch (error) {
    state.models = [];
    if (!handleAuthError(error)) console.warn(`model list unavailable: ${describe(error)}`);
  }
  els.model.replaceChildren(...state.models.map((model) => {
    const option = document.createElement("option");
    option.value = model.name;
    const classes = model.classes ? ` \u00b7 ${model.classes} classes` : "";
    option.textContent = `${model.name}${model.name === state.defaultModel ? " (default)" : ""}${classes}`;
    if (model.description) option.title = model.description;
    return option;
  }));
  els.modelField.hidden = !severalModels();
}

/** The labels of `model` ({name, version}, a prediction's), fetched once per model and version. */
function loadLabels(model) {
  const key = `${model.name}@${model.version}`;
  if (!labelRequests.has(key)) {
    labelRequests.set(key, client.modelLabels(model.name).then((answer) => {
      const known = labelsOf(model.name);
      answer.labels.forEach((label, classIndex) => known.set(classIndex, label));
    }).catch((error) => {
      labelRequests.delete(key);  // a later correction tries again
      if (!handleAuthError(error)) console.warn(`labels of ${model.name} unavailable: ${describe(error)}`);
    }));
  }
  return labelRequests.get(key);
}

function labelsOf(modelName) {
  if (!knownLabels.has(modelName)) knownLabels.set(modelName, new Map());
  return knownLabels.get(modelName);
}

// -- results -------------------------------------------------------------------------------------

function clearResults() {
  for (const url of objectUrls.splice(0)) URL.revokeObjectURL(url);
  els.results.querySelectorAll(".result").forEach((card) => card.remove());
  els.resultsEmpty.hidden = false;
}

function learnLabels(modelName, scores) {
  const known = labelsOf(modelName);
  for (const score of scores ?? []) known.set(score.class_index, score.label);
}

function renderBars(list, item) {
  const scores = item.top_k;
  learnLabels(modelOf(item), scores);
  list.replaceChildren(...scores.map((score) => {
    const row = clone("bar-template");
    row.querySelector(".bar-label").textContent = score.label;
    row.querySelector(".bar-label").title = `${modelOf(item)} class ${score.class_index}`;
    row.querySelector(".bar-fill").style.width = `${Math.max(0, Math.min(1, score.score)) * 100}%`;
    row.querySelector(".bar-value").textContent = percent(score.score);
    return row;
  }));
}

/** A result card for `filename`, showing `imageUrl` (or a placeholder frame), on top of the results. */
function cardFrame(filename, imageUrl) {
  const card = clone("result-template");
  const img = card.querySelector("img");
  const placeholder = () => {
    img.hidden = true; // not an image this browser can show: the frame stays as a placeholder
    img.parentElement.classList.add("placeholder");
  };
  if (imageUrl) {
    img.addEventListener("error", placeholder, { once: true });
    img.src = imageUrl;
    img.alt = filename;
  } else {
    placeholder();
  }
  card.dataset.filename = filename;
  card.dataset.state = "pending";
  card.querySelector(".result-file").textContent = filename;
  card.querySelector(".result-label").textContent = filename;
  els.resultsEmpty.hidden = true;
  els.results.prepend(card);
  return card;
}

function newCard(file) {
  const url = URL.createObjectURL(file);
  objectUrls.push(url);
  return cardFrame(file.name, url);
}

function fillCard(card, result) {
  card.dataset.state = "done";
  card.dataset.historyId = result.id;
  card.querySelector(".result-pending").remove();
  card.querySelector(".result-label").textContent = result.label;
  const model = card.querySelector(".result-model");
  model.textContent = `Model ${modelOf(result)}`;
  model.hidden = !severalModels();
  renderBars(card.querySelector(".bars"), result);
  const { options, timing_ms: timing } = result;
  const total = Object.values(timing ?? {}).reduce((sum, ms) => sum + ms, 0);
  card.querySelector(".result-meta").textContent =
    `top ${options.top_k} \u00b7 resize ${options.resize} \u00b7 crop ${options.crop} \u00b7 ` +
    `${options.interpolation} \u00b7 ${options.color} \u00b7 ${total.toFixed(0)} ms`;
  card.querySelector(".feedback-slot").replaceWith(feedbackControl(result));
}

function failCard(card, error) {
  card.dataset.state = "error";
  card.querySelector(".result-pending").remove();
  card.querySelector(".result-label").textContent = "Not classified";
  const message = card.querySelector(".result-error");
  message.textContent = describe(error);
  message.hidden = false;
}

async function classify(file) {
  const card = newCard(file);
  const thumbnail = makeThumbnail(file);
  try {
    const result = await client.predict(file);
    fillCard(card, result);
    rememberResult(result, file.name);
    const dataUrl = await thumbnail;
    if (dataUrl) saveThumb(result.id, dataUrl);
    prependHistory(result);
  } catch (error) {
    failCard(card, error);
    handleAuthError(error);
  }
}

async function classifyAll(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  if (!client.token) {
    showAlert("Log in first, then drop your images again.");
    return;
  }
  showAlert("");
  let next = 0;
  const worker = async () => {
    while (next < files.length && client.token) await classify(files[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(UPLOAD_CONCURRENCY, files.length) }, worker));
}

// -- the last results, kept in sessionStorage for a reload -----------------------------------------

const resultsKey = () => `${RESULTS_PREFIX}${state.sessionId}`;

function rememberedResults() {
  try {
    const kept = JSON.parse(sessionStorage.getItem(resultsKey()) ?? "[]");
    return Array.isArray(kept) ? kept : [];
  } catch {
    return [];
  }
}

function keepResults(results) {
  try {
    sessionStorage.setItem(resultsKey(), JSON.stringify(results.slice(0, KEPT_RESULTS)));
  } catch {
    // Storage full (thumbnails take most of it): the cards are not kept across a reload.
  }
}

function rememberResult(result, filename) {
  const { id, label, model, top_k: topK, options, timing_ms: timing } = result;
  const kept = { id, filename, label, model, top_k: topK, options, timing_ms: timing, feedback: result.feedback ?? null };
  keepResults([kept, ...rememberedResults().filter((each) => each.id !== id)]);
}

function rememberFeedback(historyId, feedback) {
  keepResults(rememberedResults().map((each) => (each.id === historyId ? { ...each, feedback } : each)));
}

/** The kept cards, oldest first so that the newest ends on top, as they were before the reload. */
function restoreResults() {
  for (const kept of rememberedResults().reverse()) {
    const card = cardFrame(kept.filename, sessionStorage.getItem(thumbKey(kept.id)));
    card.dataset.restored = "true";
    fillCard(card, kept);
  }
}

// -- thumbnails (made here from the upload, kept in sessionStorage by history id) ---------------

async function makeThumbnail(file) {
  try {
    const bitmap = await createImageBitmap(file);
    const side = Math.min(bitmap.width, bitmap.height);
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = THUMB_SIZE;
    const context = canvas.getContext("2d");
    context.drawImage(bitmap, (bitmap.width - side) / 2, (bitmap.height - side) / 2, side, side,
      0, 0, THUMB_SIZE, THUMB_SIZE);
    bitmap.close?.();
    return canvas.toDataURL("image/jpeg", 0.75);
  } catch {
    return null; // not decodable here: the history shows a placeholder
  }
}

const thumbKey = (historyId) => `${THUMB_PREFIX}${state.sessionId}.${historyId}`;

function thumbKeys() {
  const prefix = `${THUMB_PREFIX}${state.sessionId}.`;
  return Object.keys(sessionStorage).filter((key) => key.startsWith(prefix));
}

function saveThumb(historyId, dataUrl) {
  try {
    sessionStorage.setItem(thumbKey(historyId), dataUrl);
  } catch {
    // Storage full: drop the oldest thumbnails of this session and try once more.
    for (const key of thumbKeys().sort().slice(0, 20)) sessionStorage.removeItem(key);
    try { sessionStorage.setItem(thumbKey(historyId), dataUrl); } catch { /* placeholder then */ }
  }
}

// -- history -------------------------------------------------------------------------------------

function setCount(count) {
  state.predictions = count;
  els.historyCount.textContent = count ? `${count} prediction${count === 1 ? "" : "s"}` : "";
}

function historyRow(item) {
  const row = clone("history-template");
  row.dataset.historyId = item.id;
  const thumb = row.querySelector(".thumb");
  const dataUrl = sessionStorage.getItem(thumbKey(item.id));
  if (dataUrl) {
    const img = document.createElement("img");
    img.src = dataUrl;
    img.alt = "";
    thumb.append(img);
  } else {
    thumb.classList.add("placeholder");
    thumb.dataset.placeholder = "true";
  }
  const best = item.top_k[0];
  row.querySelector(".history-label").textContent = item.label;
  row.querySelector(".history-meta").textContent = `${timeOf(item.created_at)} \u00b7 top ${item.options.top_k}`
    + (severalModels() ? ` \u00b7 ${modelOf(item)}` : "");
  row.querySelector(".history-score").textContent = best ? percent(best.score) : "";
  const open = row.querySelector(".history-open");
  open.title = item.top_k.map((score) => `${score.label}: ${percent(score.score)}`).join("\n");
  const bars = row.querySelector(".history-bars");
  bars.id = `history-bars-${++controlCount}`;
  open.setAttribute("aria-controls", bars.id);
  // Opening the item shows its top-k as bars, as its result card did.
  open.addEventListener("click", () => {
    const opening = bars.hidden;
    if (opening) renderBars(bars, item);
    else bars.replaceChildren();
    bars.hidden = !opening;
    open.setAttribute("aria-expanded", String(opening));
    row.classList.toggle("open", opening);
  });
  learnLabels(modelOf(item), item.top_k);
  row.querySelector(".feedback-slot").replaceWith(feedbackControl(item));
  return row;
}

function renderHistory(items, { reset = false } = {}) {
  if (reset) els.history.replaceChildren();
  els.history.append(...items.map(historyRow));
  els.historyEmpty.hidden = els.history.childElementCount > 0;
  els.historyMore.hidden = !state.cursor;
}

function prependHistory(item) {
  if (els.history.querySelector(`[data-history-id="${CSS.escape(item.id)}"]`)) return;
  els.history.prepend(historyRow(item));
  els.historyEmpty.hidden = true;
  setCount(state.predictions + 1);
}

async function loadHistory({ reset = false } = {}) {
  if (reset) state.cursor = null;
  els.historyMore.disabled = true;
  els.historyError.hidden = true;
  try {
    const page = await client.historyPage({ limit: HISTORY_PAGE, before: state.cursor ?? undefined });
    state.cursor = page.next;
    renderHistory(page.items, { reset });
  } catch (error) {
    if (!handleAuthError(error)) {
      els.historyError.textContent = `Could not load the history: ${describe(error)}`;
      els.historyError.hidden = false;
    }
  } finally {
    els.historyMore.disabled = false;
  }
}

// -- corrections ("correct this") ----------------------------------------------------------------

/** Every correction control for this history item: its result card's and its history row's. */
function feedbackControls(historyId) {
  return document.querySelectorAll(`.feedback[data-history-id="${CSS.escape(historyId)}"]`);
}

function showFeedback(control, feedback, modelName) {
  const given = control.querySelector(".feedback-given");
  given.hidden = !feedback;
  // The visible words start the accessible name, which also says which prediction it is about.
  const open = control.querySelector(".feedback-open");
  const about = document.createElement("span");
  about.className = "visually-hidden";
  about.textContent = feedback ? ` the correction of ${control.dataset.predicted}`
    : ` prediction: ${control.dataset.predicted}`;
  open.replaceChildren(feedback ? "Change" : "Correct this", about);
  if (feedback) {
    control.querySelector(".feedback-given-label").textContent = feedback.label;
    given.title = `${modelName} class ${feedback.class_index}`;
  }
  control.dataset.feedback = feedback ? String(feedback.class_index) : "";
}

/** How well a label matches the typed text (lower is better), or null: the whole name or its class
 * number, then names starting with the text, then a word of the name starting with it, then anywhere. */
function matchRank(query, classIndex, label) {
  const name = label.toLowerCase();
  if (name === query || String(classIndex) === query) return 0;
  if (name.startsWith(query)) return 1;
  if (name.split(/[\s,'-]+/).some((word) => word.startsWith(query))) return 2;
  return name.includes(query) ? 3 : null;
}

/** The label suggestions for `text` among `known` (the prediction's model's labels), given the
 * prediction's own top-k (`ownScores`, best first): with nothing typed, those; else the matches by rank,
 * the prediction's own labels first within a rank (so "tiger c" offers "tiger cat" first, and "tiger"
 * the exact "tiger" first). */
function suggestLabels(text, ownScores, known) {
  const own = (ownScores ?? []).map((score) => [score.class_index, score.label]);
  const query = text.trim().toLowerCase();
  if (!query) return own.slice(0, LABEL_SUGGESTIONS);
  const ownPlace = new Map(own.map(([classIndex], place) => [classIndex, place]));
  const candidates = new Map([...known, ...own]);
  const matches = [];
  for (const [classIndex, label] of candidates) {
    const rank = matchRank(query, classIndex, label);
    if (rank !== null) matches.push({ classIndex, label, rank, place: ownPlace.get(classIndex) ?? Infinity });
  }
  matches.sort((a, b) => a.rank - b.rank || a.place - b.place || a.label.localeCompare(b.label));
  return matches.slice(0, LABEL_SUGGESTIONS).map(({ classIndex, label }) => [classIndex, label]);
}

function feedbackControl(item) {
  const control = clone("feedback-template");
  const id = `fb-${++controlCount}`;
  const modelName = modelOf(item);
  control.dataset.historyId = item.id;
  control.dataset.predicted = item.label;
  control.dataset.model = modelName;
  const open = control.querySelector(".feedback-open");
  const form = control.querySelector(".feedback-form");
  const input = control.querySelector(".feedback-input");
  const list = control.querySelector(".combobox-list");
  const error = control.querySelector(".feedback-error");
  const status = control.querySelector(".feedback-status");
  const remove = control.querySelector(".feedback-remove");
  input.id = `${id}-input`;
  list.id = `${id}-options`;
  form.id = `${id}-form`;
  control.querySelector(".feedback-field-label").htmlFor = input.id;
  input.setAttribute("aria-controls", list.id);
  open.setAttribute("aria-controls", form.id);
  let active = -1;

  const setError = (message) => {
    error.textContent = message;
    error.hidden = !message;
    if (message) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  };
  const options = () => Array.from(list.children);
  const highlight = (index) => {
    active = index;
    options().forEach((option, i) => option.setAttribute("aria-selected", String(i === index)));
    if (index >= 0) input.setAttribute("aria-activedescendant", options()[index].id);
    else input.removeAttribute("aria-activedescendant");
  };
  const closeList = () => {
    list.hidden = true;
    input.setAttribute("aria-expanded", "false");
    highlight(-1);
  };
  const fillList = () => {
    const matches = suggestLabels(input.value, item.top_k, labelsOf(modelName));
    list.replaceChildren(...matches.map(([classIndex, label], i) => {
      const option = document.createElement("li");
      option.id = `${id}-option-${i}`;
      option.className = "combobox-option";
      option.setAttribute("role", "option");
      option.dataset.testid = "feedback-option";
      option.dataset.classIndex = String(classIndex);
      option.textContent = label;
      const number = document.createElement("span");
      number.className = "combobox-class";
      number.textContent = `#${classIndex}`;
      option.append(number);
      return option;
    }));
    list.hidden = matches.length === 0;
    input.setAttribute("aria-expanded", String(matches.length > 0));
    highlight(-1);
  };
  const closeForm = ({ focus = true } = {}) => {
    closeList();
    setError("");
    form.hidden = true;
    open.hidden = false;
    open.setAttribute("aria-expanded", "false");
    if (focus) open.focus();
  };

  const send = async (label) => {
    setError("");
    closeList();
    form.setAttribute("aria-busy", "true");
    try {
      const updated = await client.feedback(item.id, label);
      learnLabels(modelName, [updated.feedback]);
      for (const each of feedbackControls(item.id)) showFeedback(each, updated.feedback, modelName);
      rememberFeedback(item.id, updated.feedback);
      closeForm({ focus: false });
      status.textContent = `Correction saved: ${updated.feedback.label}.`;
      remove.focus();
    } catch (caught) {
      if (handleAuthError(caught)) return;
      setError(caught instanceof NotFoundError
        ? "This prediction is no longer in the session's history."
        : describe(caught));
      input.focus();
    } finally {
      form.removeAttribute("aria-busy");
    }
  };

  open.addEventListener("click", () => {
    form.hidden = false;
    open.hidden = true;
    open.setAttribute("aria-expanded", "true");
    input.value = "";
    fillList();
    // The whole list of the prediction's model, once: the search offers it when it has come.
    if (item.model) loadLabels(item.model).then(() => { if (!form.hidden && input.value.trim()) fillList(); });
    // On a touch screen the top-k is offered already: focusing would pop the keyboard for nothing.
    if (!TOUCH.matches) input.focus();
  });
  control.querySelector(".feedback-cancel").addEventListener("click", () => closeForm());
  input.addEventListener("input", () => {
    setError("");
    fillList();
  });
  input.addEventListener("keydown", (event) => {
    const count = options().length;
    if (event.key === "ArrowDown" && count) {
      event.preventDefault();
      list.hidden = false;
      input.setAttribute("aria-expanded", "true");
      highlight((active + 1) % count);
    } else if (event.key === "ArrowUp" && count) {
      event.preventDefault();
      highlight(active <= 0 ? count - 1 : active - 1);
    } else if (event.key === "Escape") {
      event.preventDefault();
      if (!list.hidden) closeList();
      else closeForm();
    }
  });
  input.addEventListener("blur", closeList);
  // A click picks the option before the input loses focus.
  list.addEventListener("mousedown", (event) => event.preventDefault());
  list.addEventListener("click", (event) => {
    const option = event.target.closest("[role=option]");
    if (option) send(Number(option.dataset.classIndex));
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (active >= 0) {
      send(Number(options()[active].dataset.classIndex));
      return;
    }
    const text = input.value.trim();
    if (!text) {
      setError("Type a label or a class number.");
      input.focus();
      return;
    }
    send(/^\d+$/.test(text) ? Number(text) : text);
  });
  remove.addEventListener("click", async () => {
    remove.disabled = true;
    try {
      await client.removeFeedback(item.id);
      for (const each of feedbackControls(item.id)) showFeedback(each, null, modelName);
      rememberFeedback(item.id, null);
      status.textContent = "Correction removed.";
      open.focus();
    } catch (caught) {
      if (!handleAuthError(caught)) showAlert(`Could not remove the correction: ${describe(caught)}`);
    } finally {
      remove.disabled = false;
    }
  });

  if (item.feedback) learnLabels(modelName, [item.feedback]);
  showFeedback(control, item.feedback ?? null, modelName);
  return control;
}

// -- options form --------------------------------------------------------------------------------

const fieldInput = (name) => els.form.elements.namedItem(name);

function fillOptions(options) {
  state.options = options;
  for (const name of OPTION_FIELDS) fieldInput(name).value = String(options[name]);
  els.model.value = options.model ?? state.defaultModel ?? "";
}

/** The selector's choice becomes the session's model at once; the server starts its preprocessing
 * options from that model's defaults, so the form shows the options it answers with. */
async function chooseModel() {
  const model = els.model.value;
  showFieldError("model", "");
  els.formStatus.textContent = "";
  els.model.disabled = true;
  try {
    fillOptions(await client.setOptions({ model }));
    els.formStatus.textContent = `Model ${model} chosen, with its own preprocessing.`;
    const chosen = state.models.find((each) => each.name === model);
    if (chosen) loadLabels({ name: model, version: chosen.serving_version ?? chosen.active_version });
  } catch (error) {
    if (handleAuthError(error)) return;
    els.model.value = state.options?.model ?? state.defaultModel ?? "";
    showFieldError("model", describe(error));
  } finally {
    els.model.disabled = false;
  }
}

function clearFieldErrors() {
  for (const name of OPTION_FIELDS) showFieldError(name, "");
  els.formError.hidden = true;
  els.formError.textContent = "";
}

function showFieldError(name, message) {
  const input = fieldInput(name);
  const slot = $(`err-${name}`);
  slot.textContent = message;
  slot.hidden = !message;
  if (message) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
}

function readForm() {
  const changes = {};
  const problems = {};
  for (const name of OPTION_FIELDS) {
    const raw = fieldInput(name).value.trim();
    let value = raw;
    if (NUMBER_FIELDS.has(name)) {
      if (raw === "") {
        problems[name] = "Enter a number.";
        continue;
      }
      value = Number.isFinite(Number(raw)) ? Number(raw) : raw; // the server explains what is wrong
    }
    if (!state.options || value !== state.options[name]) changes[name] = value;
  }
  return { changes, problems };
}

async function saveOptions(event) {
  event.preventDefault();
  clearFieldErrors();
  els.formStatus.textContent = "";
  const { changes, problems } = readForm();
  const invalid = Object.entries(problems);
  if (invalid.length) {
    for (const [name, message] of invalid) showFieldError(name, message);
    fieldInput(invalid[0][0]).focus();
    return;
  }
  if (!Object.keys(changes).length) {
    els.formStatus.textContent = "No changes.";
    return;
  }
  els.save.disabled = true;
  try {
    fillOptions(await client.setOptions(changes));
    els.formStatus.textContent = "Saved.";
  } catch (error) {
    if (handleAuthError(error)) return;
    if (error instanceof ValidationError && OPTION_FIELDS.includes(error.field)) {
      showFieldError(error.field, error.message);
      fieldInput(error.field).focus();
    } else {
      els.formError.textContent = describe(error);
      els.formError.hidden = false;
    }
  } finally {
    els.save.disabled = false;
  }
}

// -- wiring --------------------------------------------------------------------------------------

els.sessionForm.addEventListener("submit", login);
els.logout.addEventListener("click", () => logout());
els.erase.addEventListener("click", () => logout({ erase: true }));
els.form.addEventListener("submit", saveOptions);
els.model.addEventListener("change", chooseModel);
els.form.addEventListener("input", (event) => {
  if (event.target.name) showFieldError(event.target.name, "");
  els.formStatus.textContent = "";
});
els.historyMore.addEventListener("click", () => loadHistory());
els.fileInput.addEventListener("change", async () => {
  const files = Array.from(els.fileInput.files ?? []);
  els.fileInput.value = ""; // choosing the same file again fires `change` again
  await classifyAll(files);
});

for (const type of ["dragenter", "dragover"]) {
  els.dropzone.addEventListener(type, (event) => {
    event.preventDefault();
    els.dropzone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "dragend"]) {
  els.dropzone.addEventListener(type, () => els.dropzone.classList.remove("dragging"));
}
els.dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  els.dropzone.classList.remove("dragging");
  classifyAll(event.dataTransfer?.files ?? []);
});
// An image pasted anywhere on the page (a screenshot, a copied image) is classified like a dropped one;
// a paste without image files (text into a field) is left alone.
document.addEventListener("paste", (event) => {
  const images = Array.from(event.clipboardData?.files ?? []).filter((file) => file.type.startsWith("image/"));
  if (!images.length) return;
  event.preventDefault();
  classifyAll(images);
});
// A file dropped beside the zone must not navigate away from the page.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

async function start() {
  setLoggedIn(null);
  renderHistory([], { reset: true });
  if (client.token) {
    try {
      await enterSession(await client.session());
    } catch (error) {
      if (!handleAuthError(error)) showAlert(describe(error));
    }
  }
  document.body.dataset.ready = "true";
}

start();
