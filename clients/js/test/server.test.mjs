// The client against a real server: `python -m server --port 0` with its embedded Redis, started
// once for this file with an API key, one CORS origin and capture on (see server-process.mjs).
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { after, before, describe, test } from "node:test";

import { AuthError, Client, NotFoundError, UnsupportedMediaType, ValidationError, defaultModel } from "../client.js";
import { CAT_CLASSES, COFFEE_CLASSES, makeModelRepository, readTestPhotos, startServer } from "./server-process.mjs";
import { rm } from "node:fs/promises";

const API_KEY = "js-client-test-key";
const ADMIN_KEY = "js-client-test-admin-key";
const ALLOWED_ORIGIN = "http://example.test";

let server;
let repository;
let cat;
let coffee;

before(async () => {
  [cat, coffee] = await readTestPhotos();
  repository = await makeModelRepository(); // "shapes", served beside the default model
  server = await startServer({
    INFERENCE_MODELS_REPOSITORY_DIR: repository,
    INFERENCE_AUTH_API_KEYS: `sha256:${createHash("sha256").update(API_KEY).digest("hex")}`,
    INFERENCE_AUTH_ADMIN_API_KEYS: `sha256:${createHash("sha256").update(ADMIN_KEY).digest("hex")}`,
    INFERENCE_HTTP_CORS_ORIGINS: `${ALLOWED_ORIGIN},http://other.test`,
    INFERENCE_CAPTURE_ENABLED: "true", // for historyImage; the images go in the server's temporary data folder
    INFERENCE_CAPTURE_MIN_FREE_DISK_BYTES: "0", // whatever this machine's free disk
  });
}, { timeout: 200_000 });

after(async () => {
  await server?.stop();
  if (repository) await rm(repository, { recursive: true, force: true });
});

async function loggedIn(settings) {
  const client = new Client(server.url, settings);
  await client.login({ apiKey: API_KEY });
  return client;
}

const top3 = (result) => result.top_k.slice(0, 3).map((score) => score.class_index);
const hasAny = (classes, wanted) => classes.some((index) => wanted.includes(index));

describe("sessions", () => {
  test("login needs the API key and returns a token and the options", async () => {
    const client = new Client(server.url);
    await assert.rejects(client.login(), (e) => e instanceof AuthError && e.code === "missing_api_key");
    await assert.rejects(client.login({ apiKey: "wrong" }),
      (e) => e instanceof AuthError && e.code === "invalid_api_key" && e.status === 401 && Boolean(e.requestId));
    assert.equal(client.token, null);
    const login = await client.login({ apiKey: API_KEY, options: { top_k: 4 } });
    assert.equal(typeof login.token, "string");
    assert.equal(client.token, login.token);
    assert.equal(login.options.top_k, 4);
    const session = await client.session();
    assert.equal(session.session_id, login.session_id);
    assert.equal(session.predictions, 0);
  });

  test("setOptions merges, options() reads, bad options are ValidationErrors naming the field", async () => {
    const client = await loggedIn();
    const options = await client.setOptions({ top_k: 2, interpolation: "bicubic" });
    assert.equal(options.top_k, 2);
    assert.equal(options.interpolation, "bicubic");
    assert.deepEqual(await client.options(), options);
    await assert.rejects(client.setOptions({ top_k: 99 }), (e) => {
      assert.ok(e instanceof ValidationError);
      assert.equal(e.status, 422);
      assert.equal(e.code, "invalid_options");
      assert.equal(e.field, "top_k");
      assert.match(e.message, /top_k/);
      return true;
    });
    await assert.rejects(client.setOptions({ crop: 512 }), (e) => e instanceof ValidationError && e.field === "crop");
    await assert.rejects(client.setOptions({ bogus: 1 }), (e) => e instanceof ValidationError && e.field === "bogus");
    assert.equal((await client.options()).top_k, 2);
  });

  test("logout revokes the token: AuthError session_revoked", async () => {
    const client = await loggedIn();
    const token = client.token;
    await client.logout();
    assert.equal(client.token, null);
    await assert.rejects(new Client(server.url, { token }).session(),
      (e) => e instanceof AuthError && e.code === "session_revoked" && e.status === 401);
    await assert.rejects(client.session(), (e) => e instanceof AuthError && e.code === "missing_token");
  });
});

describe("predictions", () => {
  test("predict a Uint8Array and a Blob: cat and coffee in the top 3", async () => {
    const client = await loggedIn();
    const catResult = await client.predict(new Uint8Array(cat));
    assert.ok(hasAny(top3(catResult), CAT_CLASSES), `cat top-3 ${top3(catResult)}`);
    assert.equal(catResult.top_k.length, 5);
    assert.equal(catResult.predicted_class, catResult.top_k[0].class_index);
    assert.match(catResult.id, /^\d+-\d+$/);

    const coffeeResult = await client.predict(new Blob([coffee])); // no type: sniffed from the bytes
    assert.ok(hasAny(top3(coffeeResult), COFFEE_CLASSES), `coffee top-3 ${top3(coffeeResult)}`);
    const typed = await client.predict(new Blob([cat], { type: "image/jpeg" }));
    assert.ok(hasAny(top3(typed), CAT_CLASSES));
  });

  test("setOptions({top_k: 2}) gives 2 results; overrides apply to one request", async () => {
    const client = await loggedIn();
    await client.setOptions({ top_k: 2 });
    assert.equal((await client.predict(cat)).top_k.length, 2);
    const overridden = await client.predict(cat, { top_k: 3, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5] });
    assert.equal(overridden.top_k.length, 3);
    assert.deepEqual(overridden.options.mean, [0.5, 0.5, 0.5]);
    await assert.rejects(client.predict(cat, { top_k: 99 }),
      (e) => e instanceof ValidationError && e.code === "invalid_options");
  });

  test("predictMany keeps the input order", async () => {
    const client = await loggedIn();
    const results = await client.predictMany([cat, coffee, cat], { concurrency: 2, top_k: 3 });
    assert.equal(results.length, 3);
    assert.ok(hasAny(top3(results[0]), CAT_CLASSES));
    assert.ok(hasAny(top3(results[1]), COFFEE_CLASSES));
    assert.ok(hasAny(top3(results[2]), CAT_CLASSES));
  });

  test("bytes that are no image: UnsupportedMediaType", async () => {
    const client = await loggedIn();
    await assert.rejects(client.predict(new TextEncoder().encode("hello")),
      (e) => e instanceof UnsupportedMediaType && e.code === "unsupported_media_type" && e.status === 415);
  });
});

describe("preprocess", () => {
  test("preprocess returns the float32 tensor under the session's options and overrides", async () => {
    const client = await loggedIn();
    await client.setOptions({ resize: 160, crop: 128 });
    const tensor = await client.preprocess(cat);
    assert.equal(tensor.dtype, "float32");
    assert.deepEqual(tensor.shape, [3, 128, 128]);
    assert.ok(tensor.data instanceof Float32Array);
    assert.equal(tensor.data.length, 3 * 128 * 128);
    assert.ok(tensor.data.every(Number.isFinite));
    const gray = await client.preprocess(cat, { color: "grayscale", crop: 64, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25] });
    assert.deepEqual(gray.shape, [3, 64, 64]);
    const plane = 64 * 64;
    assert.deepEqual(gray.data.subarray(0, plane), gray.data.subarray(plane, 2 * plane)); // one plane, 3 times
    assert.equal((await client.session()).predictions, 0);
    await assert.rejects(client.preprocess(cat, { crop: 4096 }), (e) => e instanceof ValidationError);
  });
});

describe("history", () => {
  test("history() iterates across pages, newest first; historyItem reads one", async () => {
    const pages = [];
    const fetch = (url, init) => {
      if (new URL(url).pathname === "/v1/history") pages.push(new URL(url).search);
      return globalThis.fetch(url, init);
    };
    const client = await loggedIn({ fetch });
    const made = [];
    for (const image of [cat, coffee, cat]) made.push(await client.predict(image, { top_k: 1 }));

    const items = [];
    for await (const item of client.history({ limit: 2 })) items.push(item);
    assert.deepEqual(items.map((item) => item.id), made.map((item) => item.id).reverse());
    assert.equal(pages.length, 2);
    assert.match(pages[1], /before=/);

    const { timing_ms: _timings, ...recorded } = made[1];
    assert.deepEqual(await client.historyItem(made[1].id), recorded);
    await assert.rejects(client.historyItem("1-0"),
      (e) => e instanceof NotFoundError && e.code === "history_item_not_found");

    for await (const item of client.history()) { // default page size; breaking out stops paging
      assert.equal(item.id, made[2].id);
      break;
    }
    assert.equal((await client.session()).predictions, 3);
  });
});

describe("feedback", () => {
  test("feedback by index and by name, replaced, refused, removed; another session gets 404", async () => {
    const client = await loggedIn();
    const other = await loggedIn();
    const result = await client.predict(cat);
    assert.equal(result.feedback ?? null, null);
    assert.equal((await client.historyItem(result.id)).feedback, null);
    const labels = await client.labels(result.model.name);
    assert.equal(labels.length, 1000);
    assert.equal(labels[282], "tiger cat");

    const byIndex = await client.feedback(result.id, 282, { comment: "stripes" });
    assert.equal(byIndex.id, result.id);
    assert.equal(byIndex.feedback.class_index, 282);
    assert.equal(byIndex.feedback.label, "tiger cat");
    assert.equal(byIndex.feedback.comment, "stripes");
    const byName = await client.feedback(result.id, "Egyptian CAT");
    assert.deepEqual([byName.feedback.class_index, byName.feedback.comment], [285, null]);
    assert.equal((await client.historyItem(result.id)).feedback.label, "Egyptian cat");

    for (const label of ["no such label", 1000, -1]) {
      await assert.rejects(client.feedback(result.id, label),
        (e) => e instanceof ValidationError && e.code === "invalid_feedback" && e.status === 422);
    }
    await assert.rejects(client.feedback(result.id, 1, { comment: "x".repeat(2001) }),
      (e) => e instanceof ValidationError && e.code === "invalid_feedback");
    await assert.rejects(other.feedback(result.id, 1),
      (e) => e instanceof NotFoundError && e.code === "history_item_not_found");
    await assert.rejects(other.removeFeedback(result.id), (e) => e instanceof NotFoundError);

    await client.removeFeedback(result.id);
    assert.equal((await client.historyItem(result.id)).feedback, null);
  });

  test("historyImage reads the captured image back byte for byte; logout({erase}) ends the session", async () => {
    const client = await loggedIn();
    const other = await loggedIn();
    const result = await client.predict(new Blob([cat]));
    const image = await client.historyImage(result.id);
    assert.equal(image.type, "image/jpeg");
    assert.deepEqual(new Uint8Array(await image.arrayBuffer()), new Uint8Array(cat));
    await assert.rejects(other.historyImage(result.id), (e) => e instanceof NotFoundError);
    const token = client.token;
    await client.logout({ erase: true });
    assert.equal(client.token, null);
    await assert.rejects(new Client(server.url, { token }).historyItem(result.id),
      (e) => e instanceof AuthError && e.status === 401);
  });
});

describe("models", () => {
  test("models() names the default; labels() without a model reads the session's; login and predict take a model", async () => {
    const client = await loggedIn();
    const listing = await client.models();
    const name = defaultModel(listing);
    assert.ok(listing.models.some((model) => model.name === name));
    assert.deepEqual(await client.labels(), await client.labels(name));
    const chosen = new Client(server.url);
    const login = await chosen.login({ apiKey: API_KEY, model: name });
    assert.equal(login.options.model, name);
    assert.equal((await chosen.modelLabels()).name, name);
    assert.equal((await chosen.predict(cat, { model: name })).model.name, name);
  });

  // The server serves "shapes" from its model repository beside the default model.
  test("a second model: per request, for the session (its preprocessing defaults), its own labels", async () => {
    const client = await loggedIn();
    const listing = await client.models();
    const other = listing.models.find((model) => model.name !== defaultModel(listing));
    assert.ok(other, "a second model is served");
    const labels = await client.labels(other.name);
    assert.equal(labels.length, other.classes);
    const once = await client.predict(cat, { model: other.name });
    assert.equal(once.model.name, other.name);
    assert.equal((await client.options()).model ?? null, null);
    await client.setOptions({ top_k: 2 });
    const options = await client.setOptions({ model: other.name });
    assert.equal(options.model, other.name);
    assert.equal(options.top_k, 2);
    for (const [key, value] of Object.entries(other.preprocess)) assert.deepEqual(options[key], value);
    assert.deepEqual(await client.labels(), labels);
    const result = await client.predict(coffee);
    assert.ok(labels.includes(result.label));
    const given = await client.feedback(result.id, labels.at(-1));
    assert.equal(given.feedback.class_index, labels.length - 1);
    await assert.rejects(client.setOptions({ model: "no-such-model" }),
      (e) => e instanceof ValidationError && e.code === "invalid_options" && e.field === "model");
  });
});

describe("training export", () => {
  const readAll = async (stream) => {
    const chunks = [];
    for await (const chunk of stream) chunks.push(chunk);
    return Buffer.concat(chunks);
  };

  test("exportFeedback streams the tar and the JSON lines of the feedback since a time", async () => {
    const since = new Date(Date.now() - 1);
    const client = await loggedIn();
    const result = await client.predict(cat);
    await client.feedback(result.id, "tabby");
    const tar = await readAll(await client.exportFeedback({ adminKey: ADMIN_KEY, since }));
    assert.ok(tar.includes(Buffer.from(cat)), "the captured photo is in the tar, byte for byte");
    assert.ok(tar.includes(Buffer.from(`${result.id}.json`)));
    const lines = (await readAll(await client.exportFeedback({ adminKey: ADMIN_KEY, since, format: "jsonl" })))
      .toString().trim().split("\n").map((line) => JSON.parse(line));
    assert.deepEqual(lines.map((record) => [record.history_id, record.feedback.label]), [[result.id, "tabby"]]);
    await assert.rejects(client.exportFeedback({ adminKey: "wrong" }),
      (e) => e instanceof AuthError && e.code === "invalid_api_key");
    assert.throws(() => client.exportFeedback({ adminKey: ADMIN_KEY, format: "zip" }), TypeError);
  });
});

describe("CORS", () => {
  const preflight = (origin) => fetch(`${server.url}/v1/predict`, {
    method: "OPTIONS",
    headers: {
      Origin: origin,
      "Access-Control-Request-Method": "POST",
      "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
    },
  });

  test("an allowed origin's preflight gets 204 and Access-Control-Allow-Origin", async () => {
    const response = await preflight(ALLOWED_ORIGIN);
    assert.equal(response.status, 204);
    assert.equal(response.headers.get("Access-Control-Allow-Origin"), ALLOWED_ORIGIN);
    assert.match(response.headers.get("Access-Control-Allow-Methods"), /POST/);
    const allowedHeaders = response.headers.get("Access-Control-Allow-Headers").toLowerCase();
    for (const name of ["authorization", "content-type", "idempotency-key"]) assert.ok(allowedHeaders.includes(name));
  });

  test("a disallowed origin gets no Access-Control-Allow-Origin", async () => {
    const response = await preflight("http://evil.test");
    assert.notEqual(response.status, 204);
    assert.equal(response.headers.get("Access-Control-Allow-Origin"), null);
    const login = await fetch(`${server.url}/v1/session`, { headers: { Origin: "http://evil.test" } });
    assert.equal(login.headers.get("Access-Control-Allow-Origin"), null);
  });

  test("responses to an allowed origin expose X-Request-ID and Retry-After", async () => {
    const response = await fetch(`${server.url}/v1/session`, { headers: { Origin: ALLOWED_ORIGIN } });
    assert.equal(response.status, 401);
    assert.equal(response.headers.get("Access-Control-Allow-Origin"), ALLOWED_ORIGIN);
    const exposed = response.headers.get("Access-Control-Expose-Headers").toLowerCase();
    assert.ok(exposed.includes("x-request-id") && exposed.includes("retry-after"), exposed);
  });
});
