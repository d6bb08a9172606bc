// Starting a real server for the Node tests: `python -m server --port 0` with its embedded Redis.
// The exported ONNX model is cached in a fixed temporary folder, so only the first run on a machine
// pays for the export.
import { spawn } from "node:child_process";
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
  return { url, stop, log: () => log };
}
