"""The seed-style Flask app: one request = PIL full decode + torchvision transforms + one torch forward.

python -m bench.peers.flask_app --port P   (run with cwd = the repository root)
POST /predict, multipart field `image` -> {"predicted_class": N}. threaded=True (Werkzeug's
thread-per-request server); torch keeps its default intra-op thread count (the seed did not set it)
unless BENCH_TORCH_THREADS is set.
"""

from __future__ import annotations

import argparse
import os

import torch
from flask import Flask, jsonify, request

from bench import pipelines


def make_app() -> Flask:
    if os.environ.get("BENCH_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_TORCH_THREADS"]))
    module = pipelines.load_torch_module()
    transform = pipelines.seed_transform()
    app = Flask(__name__)

    @app.post("/predict")
    def predict():  # type: ignore[no-untyped-def]
        upload = request.files.get("image")
        if upload is None:
            return jsonify({"error": "missing image"}), 400
        batch = pipelines.seed_preprocess(upload.read(), transform)[None]
        with torch.inference_mode():
            logits = module(torch.from_numpy(batch))
        return jsonify({"predicted_class": int(logits.argmax(dim=1).item())})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.flask_app")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = make_app()
    print(f"ready on http://127.0.0.1:{args.port} (flask, torch threads={torch.get_num_threads()})", flush=True)
    app.run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
