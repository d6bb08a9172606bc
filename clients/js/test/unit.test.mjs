// The client against a fake fetch: retries, back-off, timeouts, headers and paging, no server; and
// predictStream against a fake WebSocket: resuming after a 1001 close.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  AuthError, Client, ConnectionFailed, InferenceError, NotFoundError, RateLimited, ServerBusy, ServerError,
  MAX_STREAM_RESUMES, ValidationError, defaultModel, sniffImageType,
} from "../client.js";

const JPEG = new Uint8Array([0xff, 0xd8, 0xff, 0xe0, 0, 0x10, 0x4a, 0x46, 0x49, 0x46]);
const PNG = new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 0x0d]);
const PREDICTION = { id: "1-0", label: "tabby", predicted_class: 281, top_k: [] };

function json(status, body, headers = {}) {
  return new Response(body === undefined ? null : JSON.stringify(body), {
    status, headers: { "Content-Type": "application/json", "X-Request-ID": `req-${status}`, ...headers },
  });
}

function apiError(status, code, headers) {
  return json(status, { error: { code, message: `${code} happened.` } }, headers);
}

/** A fetch that answers from a script (a Response, an Error to throw, or a function) and records calls. */
function fakeFetch(...script) {
  const calls = [];
  const fetch = async (url, init = {}) => {
    calls.push({ url: new URL(url), init, headers: new Headers(init.headers), at: performance.now() });
    const step = script.length > 1 ? script.shift() : script[0];
    const answer = typeof step === "function" ? await step(url, init) : step;
    if (answer instanceof Error) throw answer;
    return answer.clone();
  };
  return { fetch, calls };
}

const client = (fetch, settings = {}) =>
  new Client("http://server.test", { fetch, token: "tok", backoff: 1, ...settings });

describe("retries", () => {
  test("503 then 200 is retried, with the same Idempotency-Key", async () => {
    const { fetch, calls } = fakeFetch(apiError(503, "server_busy", { "Retry-After": "0" }), json(200, PREDICTION));
    const result = await client(fetch).predict(JPEG);
    assert.deepEqual(result, PREDICTION);
    assert.equal(calls.length, 2);
    const keys = calls.map((call) => call.headers.get("Idempotency-Key"));
    assert.match(keys[0], /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    assert.equal(keys[0], keys[1]);
  });

  test("each logical predict has its own Idempotency-Key", async () => {
    const { fetch, calls } = fakeFetch(json(200, PREDICTION));
    const c = client(fetch);
    await c.predict(JPEG);
    await c.predict(JPEG);
    assert.notEqual(calls[0].headers.get("Idempotency-Key"), calls[1].headers.get("Idempotency-Key"));
  });

  test("429 then 200 is retried", async () => {
    const { fetch, calls } = fakeFetch(apiError(429, "rate_limited", { "Retry-After": "0" }), json(200, PREDICTION));
    await client(fetch).predict(JPEG);
    assert.equal(calls.length, 2);
  });

  for (const [status, code, Kind] of [
    [422, "invalid_options", ValidationError], [400, "malformed_multipart", ValidationError],
    [401, "session_revoked", AuthError], [404, "history_item_not_found", NotFoundError],
    [500, "inference_failed", ServerError], [403, "cors_origin_not_allowed", InferenceError],
  ]) {
    test(`${status} is not retried and throws ${Kind.name}`, async () => {
      const { fetch, calls } = fakeFetch(apiError(status, code));
      await assert.rejects(client(fetch).predict(JPEG), (error) => {
        assert.ok(error instanceof Kind, `${error.name} is not ${Kind.name}`);
        assert.ok(error instanceof InferenceError);
        assert.equal(error.status, status);
        assert.equal(error.code, code);
        assert.equal(error.message, `${code} happened.`);
        assert.equal(error.requestId, `req-${status}`);
        return true;
      });
      assert.equal(calls.length, 1);
    });
  }

  test("network errors are retried with exponential back-off, then ConnectionFailed", async () => {
    const { fetch, calls } = fakeFetch(new TypeError("fetch failed"));
    await assert.rejects(client(fetch, { retries: 2, backoff: 40 }).predict(JPEG), (error) => {
      assert.ok(error instanceof ConnectionFailed);
      assert.equal(error.code, "network_error");
      assert.equal(error.status, 0);
      assert.ok(error.cause instanceof TypeError);
      return true;
    });
    assert.equal(calls.length, 3);
    const gaps = [calls[1].at - calls[0].at, calls[2].at - calls[1].at];
    assert.ok(gaps[0] >= 18 && gaps[1] >= 38, `back-off gaps ${gaps}`); // [20, 40] then [40, 80] ms
  });

  test("503 until the retries run out throws ServerBusy with retryAfter", async () => {
    const { fetch, calls } = fakeFetch(apiError(503, "store_unavailable", { "Retry-After": "0" }));
    await assert.rejects(client(fetch, { retries: 2 }).options(), (error) => {
      assert.ok(error instanceof ServerBusy);
      assert.equal(error.code, "store_unavailable");
      assert.equal(error.retryAfter, 0);
      return true;
    });
    assert.equal(calls.length, 3);
  });

  test("Retry-After is honoured", async () => {
    const { fetch, calls } = fakeFetch(apiError(429, "rate_limited", { "Retry-After": "0.25" }), json(200, PREDICTION));
    await client(fetch).predict(JPEG);
    assert.ok(calls[1].at - calls[0].at >= 240, `waited ${calls[1].at - calls[0].at} ms`);
  });

  test("a RateLimited error carries retryAfter", async () => {
    const { fetch } = fakeFetch(apiError(429, "rate_limited", { "Retry-After": "7" }));
    await assert.rejects(client(fetch, { retries: 0 }).predict(JPEG),
      (error) => error instanceof RateLimited && error.retryAfter === 7);
  });

  test("a timeout aborts the attempt, is retried, then throws ConnectionFailed(timeout)", async () => {
    const hang = (url, init) => new Promise((resolve, reject) => {
      init.signal.addEventListener("abort", () => reject(new DOMException("aborted", "AbortError")));
    });
    const { fetch, calls } = fakeFetch(hang);
    await assert.rejects(client(fetch, { timeout: 30, retries: 1 }).session(),
      (error) => error instanceof ConnectionFailed && error.code === "timeout");
    assert.equal(calls.length, 2);
  });
});

describe("requests", () => {
  test("predict sends raw bytes with the sniffed type and overrides as a query string", async () => {
    const { fetch, calls } = fakeFetch(json(200, PREDICTION));
    await client(fetch).predict(PNG, { top_k: 3, mean: [0.1, 0.2, 0.3], crop: undefined });
    const [call] = calls;
    assert.equal(call.init.method, "POST");
    assert.equal(call.url.pathname, "/v1/predict");
    assert.equal(call.url.search, "?top_k=3&mean=0.1%2C0.2%2C0.3");
    assert.equal(call.headers.get("Content-Type"), "image/png");
    assert.equal(call.headers.get("Authorization"), "Bearer tok");
  });

  test("image inputs: ArrayBuffer, typed-array views and Blobs (magic bytes win over Blob.type)", async () => {
    const { fetch, calls } = fakeFetch(json(200, PREDICTION));
    const c = client(fetch);
    const padded = new Uint8Array([9, 9, ...JPEG]);
    await c.predict(JPEG.buffer);
    await c.predict(padded.subarray(2));
    await c.predict(new Blob([PNG], { type: "image/webp" }));
    await c.predict(new Blob([new Uint8Array([1, 2, 3])], { type: "image/bmp" }));
    await c.predict(new Uint8Array([1, 2, 3]));
    assert.deepEqual(calls.map((call) => call.headers.get("Content-Type")),
      ["image/jpeg", "image/jpeg", "image/png", "image/bmp", "application/octet-stream"]);
    assert.deepEqual(new Uint8Array(calls[1].init.body), JPEG);
    await assert.rejects(c.predict("not bytes"), TypeError);
  });

  test("sniffImageType knows the five types", () => {
    const ascii = (text) => Uint8Array.from(text, (ch) => ch.charCodeAt(0));
    assert.equal(sniffImageType(JPEG), "image/jpeg");
    assert.equal(sniffImageType(PNG), "image/png");
    assert.equal(sniffImageType(ascii("GIF89a")), "image/gif");
    assert.equal(sniffImageType(ascii("RIFF\0\0\0\0WEBPVP8 ")), "image/webp");
    assert.equal(sniffImageType(ascii("BM\0\0")), "image/bmp");
    assert.equal(sniffImageType(ascii("hello")), null);
  });

  test("login sends the API key and options, keeps the token; logout clears it", async () => {
    const { fetch, calls } = fakeFetch(json(201, { token: "new", session_id: "s", options: {} }), json(204));
    const c = client(fetch, { token: null });
    await c.login({ apiKey: "k", options: { top_k: 3 } });
    assert.equal(calls[0].headers.get("Authorization"), "ApiKey k");
    assert.equal(calls[0].headers.get("Content-Type"), "application/json");
    assert.deepEqual(JSON.parse(calls[0].init.body), { options: { top_k: 3 } });
    assert.equal(c.token, "new");
    await c.logout();
    assert.equal(calls[1].init.method, "DELETE");
    assert.equal(calls[1].headers.get("Authorization"), "Bearer new");
    assert.equal(c.token, null);
  });

  test("feedback PUTs the label (index or name) and the comment; removeFeedback DELETEs it", async () => {
    const item = { id: "1/0", feedback: { class_index: 282, label: "tiger cat", comment: "stripes" } };
    const { fetch, calls } = fakeFetch(json(200, item), json(200, item), json(204));
    const c = client(fetch);
    assert.deepEqual(await c.feedback("1/0", 282, { comment: "stripes" }), item);
    await c.feedback("1/0", "Tiger Cat");
    await c.removeFeedback("1/0");
    assert.deepEqual(calls.map((call) => [call.init.method, call.url.pathname]), [
      ["PUT", "/v1/history/1%2F0/feedback"], ["PUT", "/v1/history/1%2F0/feedback"],
      ["DELETE", "/v1/history/1%2F0/feedback"],
    ]);
    assert.deepEqual(JSON.parse(calls[0].init.body), { label: 282, comment: "stripes" });
    assert.deepEqual(JSON.parse(calls[1].init.body), { label: "Tiger Cat" });
    assert.equal(calls[0].headers.get("Content-Type"), "application/json");
    assert.equal(calls[0].headers.get("Authorization"), "Bearer tok");
    await assert.rejects(c.feedback("1-0", 2.5), TypeError);
    await assert.rejects(c.feedback("1-0", null), TypeError);
    assert.equal(calls.length, 3);
  });

  test("a refused feedback is a ValidationError or NotFoundError, not retried", async () => {
    const { fetch, calls } = fakeFetch(apiError(422, "invalid_feedback"), apiError(404, "history_item_not_found"));
    const c = client(fetch);
    await assert.rejects(c.feedback("1-0", "no such label"),
      (error) => error instanceof ValidationError && error.code === "invalid_feedback");
    await assert.rejects(c.removeFeedback("9-0"), (error) => error instanceof NotFoundError && error.status === 404);
    assert.equal(calls.length, 2);
  });

  test("historyImage returns the bytes as a Blob with their type; an error is still typed", async () => {
    const image = new Response(JPEG, { status: 200, headers: { "Content-Type": "image/jpeg" } });
    const { fetch, calls } = fakeFetch(image, apiError(404, "history_image_not_found"));
    const c = client(fetch);
    const blob = await c.historyImage("1-0");
    assert.equal(blob.type, "image/jpeg");
    assert.deepEqual(new Uint8Array(await blob.arrayBuffer()), JPEG);
    assert.equal(calls[0].url.pathname, "/v1/history/1-0/image");
    await assert.rejects(c.historyImage("1-0"), (error) => error instanceof NotFoundError);
  });

  test("logout({erase: true}) asks the server to erase; activateVersion sends traffic_percent", async () => {
    const { fetch, calls } = fakeFetch(json(204), json(200, { version: "v2" }), json(200, { version: "v2" }));
    const c = client(fetch);
    await c.logout({ erase: true });
    assert.equal(calls[0].url.search, "?erase=true");
    assert.equal(c.token, null);
    await c.activateVersion("m", "v2", { adminKey: "a", trafficPercent: 10 });
    await c.activateVersion("m", "v2", { adminKey: "a" });
    assert.deepEqual(JSON.parse(calls[1].init.body), { traffic_percent: 10 });
    assert.equal(calls[1].url.pathname, "/v1/models/m/versions/v2:activate");
    assert.equal(calls[2].init.body, undefined);
  });

  test("exportFeedback retries until the answer starts, then hands over its body as a stream", async () => {
    const tar = new Uint8Array([1, 2, 3, 4]);
    const { fetch, calls } = fakeFetch(apiError(503, "server_busy", { "Retry-After": "0" }),
      new Response(tar, { status: 200, headers: { "Content-Type": "application/x-tar" } }));
    const c = client(fetch);
    const stream = await c.exportFeedback({
      adminKey: "adm", since: new Date(Date.UTC(2026, 11, 1)), until: 1796150310065, model: "shapes", modelVersion: "v2",
      format: "jsonl",
    });
    assert.ok(stream instanceof ReadableStream);
    assert.deepEqual(new Uint8Array(await new Response(stream).arrayBuffer()), tar);
    assert.equal(calls.length, 2);
    assert.equal(calls[1].url.pathname, "/v1/feedback/export");
    assert.deepEqual(Object.fromEntries(calls[1].url.searchParams), {
      since: "2026-12-01T00:00:00.000Z", until: "1796150310065", model: "shapes", model_version: "v2", format: "jsonl",
    });
    assert.equal(calls[1].headers.get("Authorization"), "ApiKey adm"); // the admin key, not the token
  });

  test("setPinnable marks and unmarks a version; purgeFeedback sends its range and resolves to the count", async () => {
    const { fetch, calls } = fakeFetch(json(200, { name: "m", version: "v2", pinnable: true }),
      json(200, { name: "m", version: "v2", pinnable: false }), json(200, { deleted: 3 }));
    const c = client(fetch);
    assert.equal((await c.setPinnable("m", "v2", { adminKey: "adm" })).pinnable, true);
    assert.equal((await c.setPinnable("m", "v2", { adminKey: "adm", pinnable: false })).pinnable, false);
    assert.deepEqual(calls.slice(0, 2).map((call) => [call.init.method, call.url.pathname]), [
      ["PUT", "/v1/models/m/versions/v2/pinnable"], ["DELETE", "/v1/models/m/versions/v2/pinnable"],
    ]);
    assert.equal(await c.purgeFeedback({ adminKey: "adm", until: new Date(Date.UTC(2026, 11, 1)), session: "0123456789abcdef" }), 3);
    assert.equal(calls[2].init.method, "DELETE");
    assert.equal(calls[2].url.pathname, "/v1/feedback");
    assert.deepEqual(Object.fromEntries(calls[2].url.searchParams), {
      until: "2026-12-01T00:00:00.000Z", session: "0123456789abcdef",
    });
    assert.equal(calls[2].headers.get("Authorization"), "ApiKey adm");
    await assert.rejects(c.purgeFeedback({ adminKey: "adm" }), TypeError); // never a purge of everything
    assert.equal(calls.length, 3);
  });

  test("history() pages through next/before", async () => {
    const { fetch, calls } = fakeFetch(
      json(200, { items: [{ id: "3-0" }, { id: "2-0" }], next: "2-0" }),
      json(200, { items: [{ id: "1-0" }], next: null }),
    );
    const ids = [];
    for await (const item of client(fetch).history({ limit: 2 })) ids.push(item.id);
    assert.deepEqual(ids, ["3-0", "2-0", "1-0"]);
    assert.deepEqual(calls.map((call) => call.url.search), ["?limit=2", "?limit=2&before=2-0"]);
  });

  test("predictMany keeps input order and limits concurrency", async () => {
    let running = 0;
    let most = 0;
    const fetch = async (url, init) => {
      running++;
      most = Math.max(most, running);
      const index = new Uint8Array(await new Response(init.body).arrayBuffer())[3];
      await new Promise((resolve) => setTimeout(resolve, 20 - index * 3));
      running--;
      return json(200, { id: `${index}-0` });
    };
    const images = [0, 1, 2, 3, 4].map((i) => new Uint8Array([0xff, 0xd8, 0xff, i]));
    const results = await client(fetch).predictMany(images, { concurrency: 2 });
    assert.deepEqual(results.map((r) => r.id), ["0-0", "1-0", "2-0", "3-0", "4-0"]);
    assert.equal(most, 2);
  });

  test("a relative base URL outside a browser is a clear error, not a retried network error", async () => {
    const { fetch, calls } = fakeFetch(json(200, {}));
    await assert.rejects(new Client("", { fetch }).session(),
      (error) => error instanceof InferenceError && error.code === "invalid_url");
    assert.equal(calls.length, 0);
  });
});

describe("choosing a model", () => {
  const SHAPES = { name: "shapes", version: "1", labels: ["circle", "square", "star", "triangle", "cross"] };
  const TWO = { default: "efficientnet_lite0", models: [{ name: "efficientnet_lite0", default: true }, { name: "shapes" }] };

  test("login and predict send the model; labels() follows the session's model, else the default", async () => {
    const { fetch, calls } = fakeFetch(
      json(201, { token: "new", session_id: "s", options: {} }), json(200, PREDICTION),
      json(200, { options: { model: "shapes" } }), json(200, SHAPES),
      json(200, { options: { top_k: 5 } }), json(200, TWO), json(200, { ...SHAPES, name: "efficientnet_lite0" }),
      json(200, { models: [{ name: "only" }] }), json(200, SHAPES), json(200, SHAPES),
    );
    const c = new Client("http://server.test", { fetch, backoff: 1 });
    await c.login({ options: { top_k: 2 }, model: "shapes" });
    await c.predict(JPEG, { model: "shapes" });
    assert.deepEqual(await c.labels(), SHAPES.labels);
    assert.equal((await c.modelLabels()).name, "efficientnet_lite0");
    await c.labels(undefined, { adminKey: "a" }); // an admin key has no session: the default
    await c.labels("shapes");
    assert.deepEqual(JSON.parse(calls[0].init.body), { options: { top_k: 2, model: "shapes" } });
    assert.equal(calls[1].url.search, "?model=shapes");
    assert.deepEqual(calls.slice(2).map((call) => call.url.pathname), [
      "/v1/session/options", "/v1/models/shapes/labels", "/v1/session/options", "/v1/models",
      "/v1/models/efficientnet_lite0/labels", "/v1/models", "/v1/models/only/labels", "/v1/models/shapes/labels",
    ]);
    assert.equal(calls[7].headers.get("Authorization"), "ApiKey a");
    assert.equal(defaultModel({ models: [{ name: "a" }, { name: "b", default: true }] }), "b");
    assert.equal(defaultModel(TWO), "efficientnet_lite0");
  });
});

// -- predictStream resuming after a 1001 close ------------------------------------------------

// A fake WebSocket whose "server" follows the stream protocol: a token frame, a ready frame, a header
// and a body per image, one result per image read with the connection's own seq (from 0). Each connection follows a plan:
// `goAwayAfter: k` reads k images, answers them (last read first), then closes with 1001, leaving any
// image sent after them unread; `refuse: true` closes before opening (nothing listens).
function fakeServer(plans) {
  const connections = [];
  const later = (action) => setTimeout(action, 0); // in order: frames, then the close after them

  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.record = { plan: plans[Math.min(connections.length, plans.length - 1)], token: null, sent: [], read: [] };
      connections.push(this.record);
      this.header = null;
      later(() => {
        if (this.record.plan.refuse) return this.#closeBy(1006);
        this.readyState = 1;
        this.onopen?.({});
      });
    }

    send(data) {
      if (this.readyState !== 1) return; // as a browser's: sent after the close, silently dropped
      const { plan } = this.record;
      if (this.record.token === null) {
        this.record.token = JSON.parse(data).token;
        if (plan.refuseToken) {
          this.#frame({ type: "error", status: 401, error: { code: "session_revoked", message: "logged out" } });
          return this.#closeBy(1008, "session_revoked");
        }
        return this.#frame({ type: "ready", max_in_flight: plan.maxInFlight });
      }
      if (this.header === null) {
        this.header = JSON.parse(data);
        return;
      }
      const { ref } = this.header;
      this.header = null;
      this.record.sent.push(ref);
      if (this.record.read.length === (plan.goAwayAfter ?? Infinity)) return; // not read: the server is closing
      const seq = this.record.read.length;
      this.record.read.push(ref);
      const answer = () => this.#frame({ type: "result", ref, seq, result: { id: `c${connections.indexOf(this.record)}-${seq}`, ref } });
      if (plan.goAwayAfter === undefined) return answer();
      this.record.held = [...(this.record.held ?? []), answer];
      if (this.record.read.length === plan.goAwayAfter) {
        for (const held of this.record.held.reverse()) held();
        this.#closeBy(plan.closeCode ?? 1001, "going away");
      }
    }

    close(code) {
      this.readyState = 3;
      this.record.closedByClient = code;
    }

    #frame(frame) {
      later(() => { if (this.readyState === 1) this.onmessage?.({ data: JSON.stringify(frame) }); });
    }

    #closeBy(code, reason = "") {
      later(() => {
        if (this.readyState === 3) return;
        this.readyState = 3;
        this.onclose?.({ code, reason });
      });
    }
  }

  return { WebSocket: FakeWebSocket, connections };
}

const items = (count) => Array.from({ length: count }, (_, i) => ({ image: new Uint8Array([0xff, 0xd8, 0xff, i]), ref: `img-${i}` }));

async function stream(plans, count) {
  const server = fakeServer(plans);
  const client = new Client("http://fake", { token: "the-token", WebSocket: server.WebSocket });
  const results = [];
  let error = null;
  try {
    for await (const item of client.predictStream(items(count))) results.push(item);
  } catch (caught) {
    error = caught;
  }
  return { results, error, connections: server.connections };
}

describe("predictStream after a 1001 close", () => {
  test("resumes with the same token, sending only the unanswered images, once each, in order, first", async () => {
    const { results, error, connections } = await stream([
      { maxInFlight: 3, goAwayAfter: 2 }, // sent 0, 1, 2; answers 1, 0; 2 unread
      { maxInFlight: 4, goAwayAfter: 2 }, // sent 2 again first, then 3, 4, 5; answers 3, 2; 4 and 5 unread
      { maxInFlight: 3 }, // 4 and 5 again first, then the rest
    ], 8);
    assert.equal(error, null);
    assert.deepEqual(connections.map((c) => c.token), ["the-token", "the-token", "the-token"]);
    // Images sent after the server stopped reading (it sends its close after its last answers) are unread.
    const unread = (c) => c.sent.filter((ref) => !c.read.includes(ref));
    assert.deepEqual(connections.map((c) => c.read), [["img-0", "img-1"], ["img-2", "img-3"], ["img-4", "img-5", "img-6", "img-7"]]);
    assert.deepEqual(connections.map(unread), [["img-2", "img-3", "img-4"], ["img-4", "img-5", "img-6", "img-7"], []]);
    for (const [i, c] of connections.entries()) {
      assert.deepEqual(new Set(c.sent).size, c.sent.length, `connection ${i} sent an image twice`);
      if (i === 0) continue;
      const before = connections[i - 1];
      assert.deepEqual(c.sent.slice(0, unread(before).length), unread(before), `connection ${i} sends the unread first, in order`);
      for (const ref of c.sent) {
        assert.ok(!connections.slice(0, i).some((earlier) => earlier.read.includes(ref)), `${ref} was answered before`);
      }
    }
    // Every image read (so answered and recorded) exactly once across the connections.
    assert.deepEqual(connections.flatMap((c) => c.read).sort(), items(8).map((item) => item.ref));
    assert.equal(results.length, 8);
    for (const item of results) {
      assert.equal(item.error, null);
      assert.equal(item.result.ref, item.ref);
      assert.equal(item.seq, Number(item.ref.slice(4)), `${item.ref}: seq is the item's index in the whole stream`);
    }
    assert.deepEqual(results.map((item) => item.ref).slice(0, 2), ["img-1", "img-0"]); // completion order
    assert.deepEqual(results.map((item) => item.result.id).slice(0, 4), ["c0-1", "c0-0", "c1-1", "c1-0"]);
  });

  test("a resume tries again to connect while nothing takes it, then gives up after MAX_STREAM_RESUMES tries", async () => {
    const resumed = await stream([{ maxInFlight: 2, goAwayAfter: 1 }, { refuse: true }, { refuse: true }, { maxInFlight: 2 }], 4);
    assert.equal(resumed.error, null);
    assert.equal(resumed.connections.length, 4);
    assert.deepEqual(resumed.results.map((item) => item.seq).sort(), [0, 1, 2, 3]);

    const given = await stream([{ maxInFlight: 2, goAwayAfter: 1 }, { refuse: true }], 4);
    assert.ok(given.error instanceof ConnectionFailed, given.error);
    assert.equal(given.connections.length, 1 + MAX_STREAM_RESUMES);
    assert.deepEqual(given.results.map((item) => item.ref), ["img-0"]);
  });

  test(`resumes at most MAX_STREAM_RESUMES (${MAX_STREAM_RESUMES}) times; the next 1001 throws ConnectionFailed`, async () => {
    const { results, error, connections } = await stream([{ maxInFlight: 2, goAwayAfter: 1 }], 20);
    assert.ok(error instanceof ConnectionFailed && error.code === "connection_closed", error);
    assert.match(error.message, /1001/);
    assert.equal(connections.length, 1 + MAX_STREAM_RESUMES);
    assert.deepEqual(results.map((item) => item.ref), connections.map((c, i) => `img-${i}`)); // one answer each
    assert.deepEqual(results.map((item) => item.seq), connections.map((c, i) => i));
  });

  test("other closes are not resumed; a token refused on the resume throws AuthError", async () => {
    const lost = await stream([{ maxInFlight: 2, goAwayAfter: 1, closeCode: 1006 }], 4);
    assert.ok(lost.error instanceof ConnectionFailed && lost.error.code === "connection_closed", lost.error);
    assert.equal(lost.connections.length, 1);

    const refused = await stream([{ maxInFlight: 2, goAwayAfter: 1 }, { refuseToken: true }], 4);
    assert.ok(refused.error instanceof AuthError && refused.error.code === "session_revoked", refused.error);
    assert.equal(refused.connections.length, 2);
    assert.deepEqual(refused.results.map((item) => item.ref), ["img-0"]);
  });

  test("a first connection that does not open is not tried again", async () => {
    const { error, connections } = await stream([{ refuse: true }, { maxInFlight: 2 }], 2);
    assert.ok(error instanceof ConnectionFailed, error);
    assert.equal(connections.length, 1);
  });
});
