// Starting a real server for the Node tests: `python -m server --port 0` with its embedded Redis.
// The exported ONNX model is cached in a fixed temporary folder, so only the first run on a machine
// pays for the export.
import { spawn } from "node:child_process";
import net from "node:net";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const CLIENT_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const REPO = path.resolve(CLIENT_DIR, "../..");
const PYTHON = process.env.TEST_SERVER_PYTHON ?? "../../.venv/bin/python"; // relative to clients/js
const MODEL_CACHE = path.join(os.tmpdir(), "session-inference-js-test-model-cache");
export const CAT_CLASSES = [281, 282, 285]; // tabby, tiger cat, Egyptian cat
export const COFFEE_CLASSES = [967, 968, 504]; // espresso, cup, coffee mug

/** The test photos' bytes: [cat, coffee]. */
export function readTestPhotos() {
  return Promise.all(["cat.jpg", "coffee.jpg"].map((name) => readFile(path.join(REPO, "tests/data", name))));
}

/**
 * A model repository with one model, "shapes" (five classes, a small ONNX file that tests/model_folders.py
 * writes without torch), for a server to serve beside its default model; resolves its folder.
 */
export async function makeModelRepository() {
  const folder = await mkdtemp(path.join(os.tmpdir(), "js-client-test-models-"));
  const python = PYTHON.includes("/") ? path.resolve(CLIENT_DIR, PYTHON) : PYTHON;
  const script = "import sys, pathlib; from tests.model_folders import onnx_folder; "
    + "onnx_folder(pathlib.Path(sys.argv[1]) / 'shapes', ['circle', 'square', 'star', 'triangle', 'cross'], "
    + "layout='NCHW', output='logits', extra='[preprocess]\\nresize = 160\\ncrop = 128\\n')";
  await new Promise((resolve, reject) => {
    const child = spawn(python, ["-c", script, folder], { cwd: REPO, stdio: ["ignore", "ignore", "inherit"] });
    child.once("error", reject);
    child.once("exit", (code) => (code === 0 ? resolve() : reject(new Error(`making the model repository: ${code}`))));
  });
  return folder;
}

/** Start `python -m server --port 0`; resolve {url, stop} once it logs its ready line. */
export async function startServer(env) {
  const dataDir = await mkdtemp(path.join(os.tmpdir(), "js-client-test-data-"));
  const python = PYTHON.includes("/") ? path.resolve(CLIENT_DIR, PYTHON) : PYTHON;
  const child = spawn(python, ["-m", "server", "--port", "0"], {
    cwd: REPO,
    // One serving process unless a test asks for more (the default, one per core, depends on the machine).
    env: {
      ...process.env,
      INFERENCE_SERVER_DATA_DIR: dataDir,
      INFERENCE_MODEL_CACHE_DIR: MODEL_CACHE,
      INFERENCE_SERVER_PROCESSES: "1",
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  let log = "";
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server not ready after 180 s:\n${log}`)), 180_000);
    const onData = (chunk) => {
      log += chunk;
      const match = /ready on (http:\/\/\S+)/.exec(log);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", onData);
    child.once("error", (error) => { clearTimeout(timer); reject(error); });
    child.once("exit", (code) => { clearTimeout(timer); reject(new Error(`server exited (${code}):\n${log}`)); });
  });
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
    await exited;
    await rm(dataDir, { recursive: true, force: true });
  };
  const port = Number(new URL(url).port);
  return { url, port, stop, terminate: () => child.kill("SIGTERM"), log: () => log };
}

/** A free TCP port on 127.0.0.1 (free when asked: the caller binds it soon after). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

/** Whether a TCP connection to `port` on 127.0.0.1 is refused (nothing listens there any more). */
export function refused(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1");
    socket.once("connect", () => { socket.destroy(); resolve(false); });
    socket.once("error", () => resolve(true));
  });
}

/** Start Debian's redis-server (no persistence) on a free port; resolve {url, stop}, or null without one. */
export async function startRedis() {
  const port = await freePort();
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    { stdio: ["ignore", "pipe", "pipe"] });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  let log = "";
  const started = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`redis-server not ready after 30 s:\n${log}`)), 30_000);
    child.stdout.on("data", (chunk) => {
      log += chunk;
      if (/Ready to accept connections/.test(log)) { clearTimeout(timer); resolve(true); }
    });
    child.once("error", () => { clearTimeout(timer); resolve(false); }); // not installed
    child.once("exit", (code) => { clearTimeout(timer); reject(new Error(`redis-server exited (${code}):\n${log}`)); });
  });
  if (!started) return null;
  return {
    url: `redis://127.0.0.1:${port}/0`,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      await exited;
    },
  };
}

/**
 * A tiny TCP proxy: each connection goes to the first of `ports()` that accepts it (a load balancer that
 * has taken a stopped server out). Resolves {port, routed, close}: `routed` lists each connection's port.
 */
export async function firstThatAccepts(ports) {
  const routed = [];
  const sockets = new Set();
  const track = (socket) => { sockets.add(socket); socket.once("close", () => sockets.delete(socket)); socket.on("error", () => {}); };
  const proxy = net.createServer((client) => {
    track(client);
    client.pause();
    const candidates = [...ports()];
    const tryNext = () => {
      const port = candidates.shift();
      if (port === undefined) return client.destroy();
      const upstream = net.connect(port, "127.0.0.1");
      upstream.once("error", tryNext);
      upstream.once("connect", () => {
        upstream.removeListener("error", tryNext);
        track(upstream);
        routed.push(port);
        client.pipe(upstream);
        upstream.pipe(client);
        client.resume();
      });
    };
    tryNext();
  });
  await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
  return {
    port: proxy.address().port,
    routed,
    close: () => {
      for (const socket of sockets) socket.destroy();
      return new Promise((resolve) => proxy.close(resolve));
    },
  };
}
