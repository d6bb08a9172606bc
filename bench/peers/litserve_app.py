"""LitServe peer: two CPU workers, seed preprocessing (PIL full decode + torchvision), torch or ONNX.

python -m bench.peers.litserve_app --port P --runtime torch|onnxruntime [--onnx model.onnx]
POST /predict with multipart field `image` (the same body as the Flask peer and our /v1/predict
multipart row) -> {"predicted_class": N}. LitServe parses multipart in its API process and hands
the form to a worker; the file bytes are read there. No batching (max_batch_size=1), 1 intra-op
thread per worker (2 workers x 1 thread is the best layout on 2 cores).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import litserve as ls
import numpy as np

from bench import pipelines


class ClassifierAPI(ls.LitAPI):
    def __init__(self, runtime: str, onnx_path: str | None) -> None:
        super().__init__()
        self.runtime = runtime
        self.onnx_path = onnx_path

    def setup(self, device: str) -> None:
        import torch

        torch.set_num_threads(1)
        self.transform = pipelines.seed_transform()
        if self.runtime == "onnxruntime":
            self.forward = pipelines.onnx_forward(Path(self.onnx_path or ""), 1)
        else:
            self.forward = pipelines.torch_forward(pipelines.load_torch_module())

    def decode_request(self, request) -> np.ndarray:  # unannotated: LitServe then passes the parsed form
        upload = request["image"]
        data = upload.file.read() if hasattr(upload, "file") else bytes(upload)
        return pipelines.seed_preprocess(data, self.transform)

    def predict(self, x: np.ndarray) -> int:
        return int(self.forward(x[None]).argmax(axis=1)[0])

    def encode_response(self, output: int) -> dict[str, int]:
        return {"predicted_class": output}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.litserve_app")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch")
    parser.add_argument("--onnx", default=os.environ.get("BENCH_ONNX_PATH"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    api = ClassifierAPI(args.runtime, args.onnx)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=120)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
