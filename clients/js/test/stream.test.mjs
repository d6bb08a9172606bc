// predictStream against a real server (GET /v1/stream). Node 20 has WebSocket only behind
// --experimental-websocket: there this file runs itself again with the flag, as one test.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { AuthError, Client, ValidationError } from "../client.js";
import {
  CAT_CLASSES, COFFEE_CLASSES, firstThatAccepts, readTestPhotos, refused, startRedis, startServer,
} from "./server-process.mjs";

const top3 = (result) => result.top_k.slice(0, 3).map((score) => score.class_index);
const hasAny = (classes, wanted) => classes.some((index) => wanted.includes(index));

async function waitUntil(condition, what, deadlineMs = 60_000) {
  const deadline = Date.now() + deadlineMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

async function collect(iterable) {
  const items = [];
  for await (const item of iterable) items.push(item);
  return items;
}

if (typeof globalThis.WebSocket !== "function") {
  test("predictStream tests, run again under --experimental-websocket", { timeout: 400_000 }, async () => {
    // Without the runner's NODE_TEST_CONTEXT the child runs its tests itself and reports them as TAP.
    const { NODE_TEST_CONTEXT: _context, ...env } = process.env;
    const child = spawn(process.execPath, ["--experimental-websocket", fileURLToPath(import.meta.url)],
      { env, stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    child.stdout.on("data", (chunk) => { output += chunk; });
    child.stderr.on("data", (chunk) => { output += chunk; });
    const code = await new Promise((resolve) => child.once("exit", resolve));
    assert.equal(code, 0, output);
    assert.match(output, /# pass [1-9]/);
    assert.match(output, /# fail 0/);
  });
} else {
  let server;
  let cat;
  let coffee;

  before(async () => {
    [cat, coffee] = await readTestPhotos();
    server = await startServer({ INFERENCE_HTTP_STREAM_MAX_IN_FLIGHT: "2" });
  }, { timeout: 200_000 });

  after(async () => {
    await server?.stop();
  });

  describe("predictStream", () => {
    test("results carry their refs and are recorded in the history", async () => {
      const client = new Client(server.url);
      await client.login();
      const items = [{ image: cat, ref: "a" }, { image: coffee, ref: "b", options: { top_k: 2 } }, cat, coffee];
      const results = await collect(client.predictStream(items, { top_k: 3 }));
      assert.equal(results.length, 4);
      const byRef = Object.fromEntries(results.map((item) => [item.ref, item]));
      assert.deepEqual(Object.keys(byRef).sort(), ["2", "3", "a", "b"]); // index refs for plain images
      for (const item of results) assert.equal(item.error, null);
      assert.ok(hasAny(top3(byRef.a.result), CAT_CLASSES));
      assert.ok(hasAny(top3(byRef.b.result), COFFEE_CLASSES));
      assert.equal(byRef.b.result.top_k.length, 2); // the item's own options win over the call's
      assert.equal(byRef.a.result.top_k.length, 3);
      assert.deepEqual(results.map((item) => item.seq).sort(), [0, 1, 2, 3]);

      const history = await collect(client.history({ limit: 10 }));
      assert.deepEqual(history.map((item) => item.id).sort(), results.map((item) => item.result.id).sort());
      const { timing_ms: _timings, ...recorded } = byRef.a.result;
      assert.deepEqual(await client.historyItem(recorded.id), recorded);
    });

    test("a bad image is an error item and the stream goes on; an async iterable works", async () => {
      const client = new Client(server.url);
      await client.login();
      async function* images() {
        yield { image: cat, ref: "good" };
        yield { image: new Uint8Array([0xff, 0xd8, 0xff, 0x00, 1, 2, 3]), ref: "broken" };
        yield { image: cat, ref: "bad-option", options: { top_k: 99 } };
        yield { image: coffee, ref: "last" };
      }
      const results = Object.fromEntries((await collect(client.predictStream(images()))).map((r) => [r.ref, r]));
      assert.ok(results.good.result && results.last.result);
      assert.ok(results.broken.error instanceof ValidationError);
      assert.equal(results.broken.error.code, "invalid_image");
      assert.equal(results.broken.error.status, 422);
      assert.equal(results["bad-option"].error.code, "invalid_options");
      assert.equal(results["bad-option"].error.field, "top_k");
      assert.equal((await client.session()).predictions, 2);
    });

    test("a refused token throws AuthError", async () => {
      const stranger = new Client(server.url, { token: "not-a-token" });
      await assert.rejects(collect(stranger.predictStream([cat])),
        (e) => e instanceof AuthError && e.code === "malformed_token");
      const client = new Client(server.url);
      await client.login();
      const token = client.token;
      await client.logout();
      await assert.rejects(collect(new Client(server.url, { token }).predictStream([cat])),
        (e) => e instanceof AuthError && e.code === "session_revoked");
    });

    test("a logout during the stream yields the refused image's error, then throws AuthError", async () => {
      // Without a pause no result is owed after the refusal; with one, the server has closed the
      // stream by the time the next image is sent, and the error frame it sent first still comes.
      for (const pause of [null, 500]) {
        const client = new Client(server.url);
        await client.login();
        async function* loggedOutThen() {
          await new Client(server.url, { token: client.token }).logout(); // the stream is open: ready came
          yield cat;
          if (pause !== null) {
            await new Promise((resolve) => setTimeout(resolve, pause));
            yield cat;
          }
        }
        const seen = [];
        await assert.rejects((async () => { for await (const item of client.predictStream(loggedOutThen())) seen.push(item); })(),
          (e) => e instanceof AuthError && e.code === "session_revoked");
        assert.deepEqual(seen.map((item) => [item.seq, item.error.code]), [[0, "session_revoked"]], `pause ${pause}`);
      }
    });
  });

  describe("predictStream across a shutdown", () => {
    test("a stream the first server closes with 1001 on SIGTERM resumes on the second: each image answered and recorded once",
      { timeout: 300_000 }, async (t) => {
        const redis = await startRedis();
        if (redis === null) {
          // In CI a skip would pass the run without the test (docs/testing.md, "Missing tools and CI").
          assert.notEqual(process.env.CI, "true", "CI=true and no redis-server on the PATH: this test cannot run");
          t.skip("redis-server is not installed");
          return;
        }
        // Two servers on one Redis with one secret: a session made on either is served by both.
        const shared = { INFERENCE_REDIS_URL: redis.url, INFERENCE_AUTH_SECRET_KEYS: "js-client-resume-test-secret" };
        const servers = [];
        let proxy = null;
        try {
          servers.push(await startServer({ ...shared, INFERENCE_HTTP_STREAM_MAX_IN_FLIGHT: "3" }));
          servers.push(await startServer(shared));
          const [first, second] = servers;
          proxy = await firstThatAccepts(() => [first.port, second.port]);
          const client = new Client(`http://127.0.0.1:${proxy.port}`);
          await client.login();
          const refs = Array.from({ length: 10 }, (_, i) => `img-${i}`);
          let stopped = false;
          async function* images() {
            for (const [i, ref] of refs.entries()) {
              if (i === 4) { // a few images answered, up to three in flight: the first server shuts down
                first.terminate();
                await waitUntil(() => refused(first.port), "the first server to stop accepting connections");
                stopped = true;
              }
              yield { image: i % 2 ? cat : coffee, ref };
            }
          }
          const results = await collect(client.predictStream(images()));
          assert.ok(stopped);
          assert.ok(proxy.routed.includes(second.port), "the stream resumed on the second server");
          for (const item of results) assert.equal(item.error, null, `${item.ref}: ${item.error?.message}`);
          assert.deepEqual(results.map((item) => item.ref).sort(), [...refs].sort()); // every image answered once
          for (const item of results) assert.equal(item.seq, refs.indexOf(item.ref));
          const history = await collect(client.history({ limit: 50 }));
          assert.deepEqual(history.map((item) => item.id).sort(), results.map((item) => item.result.id).sort());
        } finally {
          await proxy?.close();
          await Promise.all(servers.map((server) => server.stop()));
          await redis.stop();
        }
      });
  });
}
