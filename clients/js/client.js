// JavaScript client for the session-aware inference server.
//
// One ES module, no build step and no dependencies: it uses only fetch, Blob, URL, AbortController
// and Web Crypto, so the same file runs in browsers and in Node 20+ (predictStream: WebSocket).
//
//   import { Client } from "@session-inference/client";
//   const client = new Client("http://127.0.0.1:8000");
//   await client.login();
//   const result = await client.predict(bytes);          // {id, label, top_k, ...}

const OPTION_NAMES = ["resize", "crop", "interpolation", "color", "mean", "std", "top_k", "model", "model_version"];

// -- errors ------------------------------------------------------------------------------------

/** Every error the client throws. `code` is the server's snake_case code (or a client-side one). */
export class InferenceError extends Error {
  constructor(message, { code = "error", status = 0, requestId = null, body = null, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = new.target.name;
    this.code = code;
    this.status = status;
    this.requestId = requestId;
    this.body = body;
  }
}
/** 401: missing, malformed, forged, expired or revoked token; wrong API key. */
export class AuthError extends InferenceError {}
/** 400 or 422: bad request, bad options (`field` names the option when known), bad image. */
export class ValidationError extends InferenceError {
  constructor(message, details = {}) {
    super(message, details);
    this.field = details.field ?? null;
  }
}
/** 404: unknown history id or route. */
export class NotFoundError extends InferenceError {}
/** 413: body over the server's `http.max_body_bytes`. */
export class PayloadTooLarge extends InferenceError {}
/** 415: not an image type the server takes. */
export class UnsupportedMediaType extends InferenceError {}
/** 429: slow down; `retryAfter` in seconds when the server said. */
export class RateLimited extends InferenceError {
  constructor(message, details = {}) {
    super(message, details);
    this.retryAfter = details.retryAfter ?? null;
  }
}
/** 503: queue full or store unavailable; `retryAfter` in seconds. */
export class ServerBusy extends InferenceError {
  constructor(message, details = {}) {
    super(message, details);
    this.retryAfter = details.retryAfter ?? null;
  }
}
/** Any other 5xx. */
export class ServerError extends InferenceError {}
/** No HTTP answer: network failure or timeout (`code` is "network_error" or "timeout"). */
export class ConnectionFailed extends InferenceError {}

function errorClass(status) {
  if (status === 401) return AuthError;
  if (status === 400 || status === 422) return ValidationError;
  if (status === 404) return NotFoundError;
  if (status === 413) return PayloadTooLarge;
  if (status === 415) return UnsupportedMediaType;
  if (status === 429) return RateLimited;
  if (status === 503) return ServerBusy;
  if (status >= 500) return ServerError;
  return InferenceError;
}

// The option an `invalid_options` message is about: "top_k must be ...", "Unknown option 'foo' ...".
function optionField(error) {
  if (typeof error?.field === "string") return error.field;
  const message = String(error?.message ?? "");
  const unknown = /^Unknown option '([^']+)'/.exec(message);
  if (unknown) return unknown[1];
  const first = /^([a-z_]+)\b/.exec(message);
  return first && OPTION_NAMES.includes(first[1]) ? first[1] : null;
}

// -- helpers -----------------------------------------------------------------------------------

function parseRetryAfter(value) {
  if (value == null || value === "") return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
}

function uuid() {
  const c = globalThis.crypto;
  if (c?.randomUUID) {
    try { return c.randomUUID(); } catch { /* insecure browser context: fall through */ }
  }
  const bytes = new Uint8Array(16);
  if (c?.getRandomValues) c.getRandomValues(bytes);
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** The image type named by the first bytes, or null. */
export function sniffImageType(bytes) {
  const b = bytes;
  if (b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return "image/jpeg";
  if (b.length >= 8 && b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47) return "image/png";
  if (b.length >= 4 && b[0] === 0x47 && b[1] === 0x49 && b[2] === 0x46 && b[3] === 0x38) return "image/gif";
  if (b.length >= 12 && b[0] === 0x52 && b[1] === 0x49 && b[2] === 0x46 && b[3] === 0x46
      && b[8] === 0x57 && b[9] === 0x45 && b[10] === 0x42 && b[11] === 0x50) return "image/webp";
  if (b.length >= 2 && b[0] === 0x42 && b[1] === 0x4d) return "image/bmp";
  return null;
}

// Image input -> [body, Content-Type]. Blobs are sent as they are (the browser streams files).
async function imageBody(image) {
  if (typeof Blob !== "undefined" && image instanceof Blob) {
    const head = new Uint8Array(await image.slice(0, 16).arrayBuffer());
    return [image, sniffImageType(head) ?? (image.type || "application/octet-stream")];
  }
  let bytes;
  if (image instanceof ArrayBuffer) bytes = new Uint8Array(image);
  else if (ArrayBuffer.isView(image)) bytes = new Uint8Array(image.buffer, image.byteOffset, image.byteLength);
  else throw new TypeError("predict(image): image must be a Blob, File, ArrayBuffer or Uint8Array");
  return [bytes, sniffImageType(bytes) ?? "application/octet-stream"];
}

/** A feedback time as the server takes it: a Date as ISO 8601, epoch milliseconds or text as given. */
function timeParam(value) {
  return value instanceof Date ? value.toISOString() : value;
}

function queryString(params) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params ?? {})) {
    if (value === undefined || value === null) continue;
    query.set(name, Array.isArray(value) ? value.join(",") : String(value));
  }
  const text = query.toString();
  return text ? `?${text}` : "";
}

// The server sends little-endian float32; DataView reads it right on any host.
function float32FromBase64(text) {
  const binary = atob(text);
  const view = new DataView(new ArrayBuffer(binary.length));
  for (let i = 0; i < binary.length; i++) view.setUint8(i, binary.charCodeAt(i));
  const values = new Float32Array(binary.length / 4);
  for (let i = 0; i < values.length; i++) values[i] = view.getFloat32(i * 4, true);
  return values;
}

function historyPath(id) {
  return `/v1/history/${encodeURIComponent(id)}`;
}

/** The model a session without the `model` option runs, from GET /v1/models; a server from before several
 * models were served names no default, and its one model is it. */
export function defaultModel(listing) {
  if (listing?.default) return listing.default;
  const served = listing?.models ?? [];
  return (served.find((model) => model.default) ?? served[0])?.name ?? null;
}

function versionPath(name, version) {
  return `/v1/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}`;
}

// -- stream helpers ----------------------------------------------------------------------------

function isStreamItem(value) {
  return value !== null && typeof value === "object" && "image" in value
    && !(typeof Blob !== "undefined" && value instanceof Blob) && !ArrayBuffer.isView(value);
}

function parseStreamFrame(data) {
  try {
    const frame = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
    if (frame && typeof frame.type === "string") return frame;
  } catch { /* fall through */ }
  throw new ServerError("A stream frame from the server is not JSON.", { code: "invalid_response" });
}

function streamFrameError(frame) {
  const status = frame.status ?? 500;
  const Kind = errorClass(status);
  const code = frame.error?.code ?? `http_${status}`;
  return new Kind(frame.error?.message ?? "The server refused this image.", {
    code, status, body: frame, retryAfter: frame.retry_after ?? null,
    field: code === "invalid_options" ? optionField(frame.error) : null,
  });
}

// Policy violation (1008): the token was refused; the error frame before the close said why.
function streamClosedError(event, lastError) {
  if (event?.code === 1008) {
    return lastError instanceof AuthError ? lastError
      : new AuthError("The server closed the stream: the token was refused.", { code: event.reason || "invalid_token", status: 401 });
  }
  return new ConnectionFailed(`The stream closed before every result came (code ${event?.code}).`,
    { code: "connection_closed" });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const GOING_AWAY = 1001; // the server shuts down after answering the images it read: resume on a new connection
/**
 * How many times one predictStream resumes after a 1001 close (each resume may try to connect this many
 * times too, with a growing pause) before the close is the caller's error; the Python clients' bound too.
 */
export const MAX_STREAM_RESUMES = 5;

/** Milliseconds to wait before the `attempt`-th (from 0) try to connect for a resume. */
const resumePause = (attempt) => Math.min(100 * 2 ** attempt, 2000);

/** The header and body frames for one stream item (an image, or {image, ref, options}). */
async function streamFrames(value, index, overrides) {
  const item = isStreamItem(value) ? value : { image: value };
  const [body] = await imageBody(item.image);
  const options = { ...overrides, ...(item.options ?? {}) };
  const header = { ref: item.ref ?? index };
  if (Object.keys(options).length) header.options = options;
  return { index, header: JSON.stringify(header), body };
}

/**
 * Which item to send next and which results are owed, across the connections of one predictStream.
 * `size` is the server's `max_in_flight` (its ready frame). After a 1001 close, `resume` on the next
 * connection sends the images not yet answered again first (each once, in order): an image answered
 * before the close is never sent again. A result's `seq` is the item's index in the whole stream.
 */
class StreamWindow {
  #iterator;
  #overrides;
  #taken = 0; // items taken from `images`
  #exhausted = false;
  #seq = 0; // this connection's next seq (the server counts from 0 per connection)
  #unanswered = new Map(); // this connection's seq -> {index, header, body}
  #resend = []; // sent on an earlier connection, unanswered there, in item order

  constructor(images, overrides, size) {
    this.#iterator = images[Symbol.asyncIterator]?.() ?? images[Symbol.iterator]();
    this.#overrides = overrides;
    this.size = Math.max(1, size);
    this.pending = 0;
    this.refusal = null;
  }

  /** The next item's frames to send ({index, header, body}), or null when the window is full or none is left. */
  async next() {
    if (this.pending >= this.size) return null;
    let sent = this.#resend.shift();
    if (sent === undefined) {
      if (this.#exhausted) return null;
      const step = await this.#iterator.next();
      if (step.done) {
        this.#exhausted = true;
        return null;
      }
      sent = await streamFrames(step.value, this.#taken++, this.#overrides);
    }
    this.#unanswered.set(this.#seq++, sent);
    this.pending++;
    return sent;
  }

  get done() { return this.#exhausted && this.pending === 0 && this.#resend.length === 0; }

  /** A result or error frame as the caller's {ref, seq, result, error}, seq mapped to the item's index. */
  received(frame) {
    let seq = frame.seq ?? null;
    if (seq !== null) { // a frame about one of our images (not about the stream as a whole)
      this.pending--;
      const sent = this.#unanswered.get(seq);
      if (sent !== undefined) {
        this.#unanswered.delete(seq);
        seq = sent.index;
      }
    }
    if (frame.type === "result") return { ref: frame.ref, seq, result: frame.result, error: null };
    const error = streamFrameError(frame);
    // A refused token (logged out, expired) ends the stream even when no result is owed any more.
    if (error instanceof AuthError) this.refusal = error;
    return { ref: frame.ref ?? null, seq, result: null, error };
  }

  /**
   * A new connection (its ready frame's max_in_flight: `size`) after a 1001 close: the images sent and not
   * answered go again first, in their order; the server counts seq from 0 again.
   */
  resume(size) {
    this.#resend = [...this.#resend, ...this.#unanswered.values()].sort((a, b) => a.index - b.index);
    this.#unanswered.clear();
    this.#seq = 0;
    this.pending = 0;
    this.size = Math.max(1, size);
  }
}

/** One WebSocket of a stream: its frames as they come (`nextFrame`) and its close event (`closed`). */
class StreamSocket {
  #inbox = [];
  #wake = null;

  constructor(WebSocketClass, url) {
    this.closed = null;
    this.socket = new WebSocketClass(url);
    this.socket.binaryType = "arraybuffer";
    this.socket.onmessage = (event) => { this.#inbox.push(event.data); this.#notify(); };
    this.socket.onclose = (event) => { this.closed = event; this.#notify(); };
    this.socket.onerror = () => {}; // a close event always follows, and says more
    this.socket.onopen = () => this.#notify();
  }

  #notify() {
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
  }

  #event() { return new Promise((resolve) => { this.#wake = resolve; }); }

  /** Whether the socket opened (false: it closed first). */
  async opened() {
    while (this.socket.readyState === 0 && !this.closed) await this.#event();
    return !this.closed;
  }

  get open() { return this.socket.readyState === 1 && !this.closed; }

  /** The next frame, or null once the socket closed and every frame before the close was read. */
  async nextFrame() {
    while (this.#inbox.length === 0) {
      if (this.closed) return null;
      await this.#event();
    }
    return parseStreamFrame(this.#inbox.shift());
  }

  close() {
    if (this.socket.readyState <= 1) this.socket.close(1000);
  }
}

// -- the client --------------------------------------------------------------------------------

export class Client {
  #fetch;
  #token;
  #WebSocket;

  /**
   * @param {string} baseUrl  server address, e.g. "http://127.0.0.1:8000"; "" = this page's origin
   * @param {object} [settings]  token, timeout (ms per attempt), retries, backoff (ms), fetch
   */
  constructor(baseUrl = "", { token = null, timeout = 30000, retries = 3, backoff = 250, fetch, WebSocket } = {}) {
    this.baseUrl = String(baseUrl ?? "").replace(/\/+$/, "");
    this.#token = token ?? null;
    this.timeout = timeout;
    this.retries = retries;
    this.backoff = backoff;
    const f = fetch ?? globalThis.fetch;
    if (typeof f !== "function") throw new TypeError("no fetch available: pass {fetch} to the Client");
    // The built-in fetch must be called with the global object as `this` in browsers.
    this.#fetch = fetch ? f : f.bind(globalThis);
    this.#WebSocket = WebSocket ?? null; // else globalThis.WebSocket, looked up when a stream opens
  }

  /** The session token (null before login and after logout); settable to resume a session. */
  get token() { return this.#token; }
  set token(value) { this.#token = value ?? null; }

  // -- sessions --------------------------------------------------------------------------------

  /**
   * POST /v1/sessions: log in and keep the token. Returns {token, session_id, expires_at, options}.
   * `model` chooses the session's model (models() lists them; absent: the server's default), as
   * `options: {model}` would.
   */
  async login({ apiKey, options, model } = {}) {
    const headers = apiKey ? { Authorization: `ApiKey ${apiKey}` } : {};
    const chosen = model === undefined ? options : { ...options, model };
    const body = await this.#request("POST", "/v1/sessions", {
      headers, json: chosen ? { options: chosen } : undefined, auth: false,
    });
    this.#token = body.token;
    return body;
  }

  /** GET /v1/session: {session_id, created_at, expires_at, options, predictions}. */
  session() { return this.#request("GET", "/v1/session"); }

  /** GET /v1/session/options: the session's options. */
  async options() { return (await this.#request("GET", "/v1/session/options")).options; }

  /**
   * PATCH /v1/session/options: merge `changes`, return the session's options after the change. A `model`
   * other than the session's starts resize, crop, interpolation, mean and std from that model's defaults
   * (unless given too).
   */
  async setOptions(changes) {
    return (await this.#request("PATCH", "/v1/session/options", { json: changes ?? {} })).options;
  }

  /**
   * DELETE /v1/session: log out; the token is refused from then on. With `{erase: true}` the server
   * also erases the session's history, feedback and captured images.
   */
  async logout({ erase = false } = {}) {
    await this.#request("DELETE", `/v1/session${erase ? "?erase=true" : ""}`);
    this.#token = null;
  }

  // -- predictions -----------------------------------------------------------------------------

  /**
   * POST /v1/predict with the image's raw bytes. `overrides` become query parameters that override
   * the session's options for this request only (arrays are joined with commas: mean, std); `model`
   * sends this image to another served model, with that model's preprocessing defaults.
   */
  async predict(image, overrides = {}) {
    const [body, contentType] = await imageBody(image);
    return this.#request("POST", `/v1/predict${queryString(overrides)}`, {
      body, headers: { "Content-Type": contentType, "Idempotency-Key": uuid() },
    });
  }

  /**
   * POST /v1/preprocess: the tensor the model would see for `image` under the session's options
   * (`overrides` as in predict). Returns {dtype: "float32", shape: [3, crop, crop], data: Float32Array,
   * options}; nothing is classified or recorded.
   */
  async preprocess(image, overrides = {}) {
    const [body, contentType] = await imageBody(image);
    const answer = await this.#request("POST", `/v1/preprocess${queryString(overrides)}`, {
      body, headers: { "Content-Type": contentType },
    });
    return { ...answer, data: float32FromBase64(answer.data) };
  }

  /**
   * Predict several images, at most `concurrency` at a time; results in input order. Rejects with
   * the first error (no new request starts after it).
   */
  async predictMany(images, { concurrency = 4, ...overrides } = {}) {
    const list = Array.from(images);
    const results = new Array(list.length);
    let next = 0;
    let failed = false;
    const worker = async () => {
      while (!failed && next < list.length) {
        const index = next++;
        try {
          results[index] = await this.predict(list[index], overrides);
        } catch (error) {
          failed = true;
          throw error;
        }
      }
    };
    const workers = Array.from({ length: Math.max(1, Math.min(concurrency, list.length)) }, worker);
    await Promise.all(workers);
    return results;
  }

  /**
   * GET /v1/stream: classify `images` (an iterable or async iterable) over one WebSocket. Yields one
   * {ref, seq, result, error} per image in completion order: `result` is what predict() returns,
   * `error` an InferenceError for that image alone. An item is an image, or {image, ref, options}
   * for its own ref and option overrides; `ref` defaults to the item's index. `overrides` apply to
   * every image. At most the server's `max_in_flight` images are outstanding; every result is
   * recorded in the history. The token goes in the first frame (browsers cannot set headers on
   * the upgrade), never in the URL. A stream the server closes with 1001 (it shuts down) resumes on
   * a new connection with the same session, sending again only the images not yet answered, each
   * once (at most MAX_STREAM_RESUMES times); `seq` is the item's index in the whole stream. Otherwise
   * not retried: a refused token throws AuthError, a lost connection ConnectionFailed.
   *   for await (const { ref, result, error } of client.predictStream(files)) { ... }
   */
  async *predictStream(images, overrides = {}) {
    const WebSocketClass = this.#WebSocket ?? globalThis.WebSocket;
    if (typeof WebSocketClass !== "function") {
      throw new InferenceError("No WebSocket implementation: pass {WebSocket} to the Client "
        + "(Node 20 needs --experimental-websocket; Node 22+ and browsers have one).", { code: "websocket_unavailable" });
    }
    const url = this.#url("/v1/stream").replace(/^http/, "ws");
    let window = null; // made from the first ready frame
    let resumes = 0;
    for (;;) {
      // A resume waits for a server to take it (a load balancer may still be taking the old one out).
      const attempts = window === null ? 1 : MAX_STREAM_RESUMES;
      let connection;
      for (let attempt = 0; ; attempt++) {
        connection = new StreamSocket(WebSocketClass, url);
        if (await connection.opened()) break;
        if (attempt + 1 >= attempts) throw streamClosedError(connection.closed, null);
        await sleep(resumePause(attempt));
      }
      let lastError = null;
      try {
        connection.socket.send(JSON.stringify({ token: this.#token ?? "" }));
        const ready = await connection.nextFrame();
        if (ready && ready.type !== "ready") {
          lastError = streamFrameError(ready);
          throw lastError;
        }
        if (ready) {
          if (window === null) window = new StreamWindow(images, overrides, ready.max_in_flight);
          else window.resume(ready.max_in_flight);
          for (;;) {
            // Once the server has closed, nothing more is sent: what it sent before the close is still read.
            for (let sent; connection.open && (sent = await window.next()) !== null;) {
              connection.socket.send(sent.header);
              connection.socket.send(sent.body);
            }
            if (window.done) return;
            const frame = await connection.nextFrame();
            if (!frame) break;
            const item = window.received(frame);
            lastError = item.error;
            yield item;
            if (window.refusal) throw window.refusal;
          }
        }
        if (window === null || connection.closed?.code !== GOING_AWAY || resumes >= MAX_STREAM_RESUMES) {
          throw streamClosedError(connection.closed, lastError);
        }
        resumes++;
      } finally {
        connection.close();
      }
    }
  }

  // -- model versions --------------------------------------------------------------------------

  /**
   * GET /v1/models: {default, models}: each served model with its classes, input, preprocessing defaults
   * and versions (hash, size, activation time); session token, or `adminKey`.
   */
  models({ adminKey } = {}) {
    return this.#request("GET", "/v1/models", { headers: adminKey ? { Authorization: `ApiKey ${adminKey}` } : {} });
  }

  /**
   * The class labels of `model` (GET /v1/models/<model>/labels), index i naming class i: what `feedback`
   * takes for that model's predictions. No model: the session's model, else the server's default.
   */
  async labels(model, { adminKey } = {}) {
    return (await this.modelLabels(model, { adminKey })).labels;
  }

  /** labels() with the model's name and version: {name, version, labels}. */
  async modelLabels(model, { adminKey } = {}) {
    const headers = adminKey ? { Authorization: `ApiKey ${adminKey}` } : {};
    let name = model ?? null;
    if (name === null && this.#token && !adminKey) name = (await this.options()).model ?? null;
    if (name === null) name = defaultModel(await this.models({ adminKey }));
    return this.#request("GET", `/v1/models/${encodeURIComponent(name)}/labels`, { headers });
  }

  /**
   * PUT /v1/models/<name>/versions/<version>: publish a state_dict file (Uint8Array, ArrayBuffer or
   * Blob) with its SHA-256 (Web Crypto). Needs a key listed in the server's auth.admin_api_keys.
   */
  async publishVersion(name, version, weights, { adminKey } = {}) {
    const bytes = typeof Blob !== "undefined" && weights instanceof Blob
      ? new Uint8Array(await weights.arrayBuffer())
      : weights instanceof ArrayBuffer ? new Uint8Array(weights) : weights;
    const digest = new Uint8Array(await globalThis.crypto.subtle.digest("SHA-256", bytes));
    const sha256 = Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
    return this.#request("PUT", versionPath(name, version), {
      body: bytes,
      headers: { Authorization: `ApiKey ${adminKey}`, "Content-Type": "application/octet-stream", "X-Content-SHA256": sha256 },
    });
  }

  /**
   * POST .../versions/<version>:activate: every replica serves it to new sessions' requests; with
   * `trafficPercent` below 100, as a canary to that share of sessions only.
   */
  activateVersion(name, version, { adminKey, trafficPercent } = {}) {
    return this.#request("POST", `${versionPath(name, version)}:activate`, {
      headers: { Authorization: `ApiKey ${adminKey}` },
      json: trafficPercent === undefined ? undefined : { traffic_percent: trafficPercent },
    });
  }

  /** DELETE .../versions/<version> (not the active one). */
  async removeVersion(name, version, { adminKey } = {}) {
    await this.#request("DELETE", versionPath(name, version), { headers: { Authorization: `ApiKey ${adminKey}` } });
  }

  /**
   * PUT (or with `pinnable: false`, DELETE) .../versions/<version>/pinnable: whether sessions may pin
   * the version with the model_version option (the active version and the canary's always may).
   */
  setPinnable(name, version, { adminKey, pinnable = true } = {}) {
    return this.#request(pinnable ? "PUT" : "DELETE", `${versionPath(name, version)}/pinnable`, {
      headers: { Authorization: `ApiKey ${adminKey}` },
    });
  }

  // -- history ---------------------------------------------------------------------------------

  /** GET /v1/history: one page, newest first: {items, next}; pass `next` back as `before`. */
  historyPage({ limit, before } = {}) {
    return this.#request("GET", `/v1/history${queryString({ limit, before })}`);
  }

  /**
   * Every history item, newest first, fetching pages of `limit` (1-100) as the loop goes on.
   *   for await (const item of client.history({ limit: 50 })) { ... }
   */
  async *history({ limit, before } = {}) {
    let cursor = before;
    do {
      const page = await this.historyPage({ limit, before: cursor });
      yield* page.items;
      cursor = page.next;
    } while (cursor);
  }

  /** GET /v1/history/<id>: one item; NotFoundError if the session has no such item. */
  historyItem(id) { return this.#request("GET", historyPath(id)); }

  /**
   * PUT /v1/history/<id>/feedback: the right label for one of the session's predictions, a class
   * index or a label name (any case), with an optional comment. Resolves to the history item, whose
   * `feedback` is now set; a repeat replaces the earlier feedback.
   */
  async feedback(id, label, { comment } = {}) {
    if (!(Number.isInteger(label) || typeof label === "string")) {
      throw new TypeError("feedback(id, label): label must be a class index (integer) or a label name");
    }
    const json = comment === undefined || comment === null ? { label } : { label, comment };
    return this.#request("PUT", `${historyPath(id)}/feedback`, { json });
  }

  /** DELETE /v1/history/<id>/feedback: take the feedback back. */
  async removeFeedback(id) {
    await this.#request("DELETE", `${historyPath(id)}/feedback`);
  }

  /** GET /v1/history/<id>/image: the image as sent (a Blob), where the server captured it. */
  historyImage(id) {
    return this.#request("GET", `${historyPath(id)}/image`, { headers: { Accept: "image/*" }, answer: "blob" });
  }

  /**
   * GET /v1/feedback/export (admin key): the training export, a WebDataset tar (`format: "tar"`) or
   * JSON lines (`"jsonl"`), as a ReadableStream of bytes to pipe where it goes, never whole in
   * memory. `since`/`until`: a Date, epoch milliseconds or ISO 8601 text; `model`: only that model's
   * predictions. Retried like any call
   * until the answer starts; the per-attempt timeout covers the start, not the whole download.
   *   await pipeline(Readable.fromWeb(await client.exportFeedback({ adminKey })), createWriteStream("f.tar"));
   */
  exportFeedback({ adminKey, since, until, model, modelVersion, format = "tar" } = {}) {
    if (!["tar", "jsonl"].includes(format)) throw new TypeError(`exportFeedback: format must be "tar" or "jsonl"`);
    const query = queryString({
      since: timeParam(since), until: timeParam(until), model, model_version: modelVersion,
      format: format === "tar" ? undefined : format,
    });
    return this.#request("GET", `/v1/feedback/export${query}`, {
      headers: { Authorization: `ApiKey ${adminKey}`, Accept: "application/x-tar, application/x-ndjson" }, answer: "stream",
    });
  }

  /**
   * DELETE /v1/feedback (admin key): the feedback given in a time range (`since`/`until`, as in
   * exportFeedback) and/or of one session (`session`: the export's `session` field). Resolves to how
   * many records went. At least one of the three is needed: a purge of everything is never guessed.
   */
  async purgeFeedback({ adminKey, since, until, session } = {}) {
    if (since === undefined && until === undefined && session === undefined) {
      throw new TypeError("purgeFeedback: give since, until or session");
    }
    const query = queryString({ since: timeParam(since), until: timeParam(until), session });
    const answer = await this.#request("DELETE", `/v1/feedback${query}`, { headers: { Authorization: `ApiKey ${adminKey}` } });
    return answer.deleted;
  }

  // -- transport -------------------------------------------------------------------------------

  #url(path) {
    const base = this.baseUrl || globalThis.location?.origin;
    try {
      return new URL(this.baseUrl + path, base).href;
    } catch {
      throw new InferenceError(`Cannot build a URL from baseUrl ${JSON.stringify(this.baseUrl)}; `
        + "pass the server's address, e.g. new Client(\"http://127.0.0.1:8000\").", { code: "invalid_url" });
    }
  }

  async #request(method, path, { json, body, headers = {}, auth = true, answer = "json" } = {}) {
    const url = this.#url(path);
    const allHeaders = { Accept: "application/json", ...headers };
    if (json !== undefined) {
      body = JSON.stringify(json);
      allHeaders["Content-Type"] = "application/json";
    }
    if (auth && this.#token && !allHeaders.Authorization) allHeaders.Authorization = `Bearer ${this.#token}`;

    for (let attempt = 0; ; attempt++) {
      let error;
      try {
        return await this.#attempt(method, url, allHeaders, body, answer);
      } catch (caught) {
        error = caught;
      }
      const retriable = error instanceof ConnectionFailed || error instanceof ServerBusy
        || error instanceof RateLimited;
      if (!retriable || attempt >= this.retries) throw error;
      const exponential = this.backoff * 2 ** attempt;
      const delay = error.retryAfter != null
        ? error.retryAfter * 1000
        : exponential / 2 + Math.random() * (exponential / 2);
      await sleep(delay);
    }
  }

  // `answer`: how a success's body is returned: "json" (parsed), "blob" (a Blob) or "stream" (its
  // unread ReadableStream). An error's is read as JSON whatever it is.
  async #attempt(method, url, headers, body, answer = "json") {
    const controller = new AbortController();
    const timer = this.timeout > 0 ? setTimeout(() => controller.abort(), this.timeout) : null;
    const fetch = this.#fetch;
    let response;
    let text;
    let blob;
    try {
      response = await fetch(url, { method, headers, body, signal: controller.signal });
      if (answer === "stream" && response.ok) return response.body;
      if (answer === "blob" && response.ok) blob = await response.blob();
      else text = await response.text();
    } catch (cause) {
      const timedOut = controller.signal.aborted;
      throw new ConnectionFailed(
        timedOut ? `${method} ${url} got no answer within ${this.timeout} ms.`
          : `${method} ${url} failed: ${cause?.cause?.message ?? cause?.message ?? cause}`,
        { code: timedOut ? "timeout" : "network_error", cause },
      );
    } finally {
      if (timer !== null) clearTimeout(timer);
    }

    const requestId = response.headers.get("X-Request-ID");
    if (blob !== undefined) return blob;
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch { data = null; }
    }
    if (response.ok) {
      if (text && data === null) {
        throw new ServerError(`${method} ${url}: the answer is not JSON.`,
          { code: "invalid_response", status: response.status, requestId });
      }
      return data ?? undefined;
    }
    const error = data?.error ?? {};
    const status = response.status;
    const Kind = errorClass(status);
    const code = error.code ?? `http_${status}`;
    throw new Kind(error.message ?? `${method} ${url} answered ${status}.`, {
      code,
      status,
      requestId,
      body: data,
      retryAfter: status === 429 || status === 503 ? parseRetryAfter(response.headers.get("Retry-After")) : null,
      field: code === "invalid_options" ? optionField(error) : null,
    });
  }
}

export default Client;
