"""LitServe peer: two CPU workers, no batching; a decoder and a runtime from bench.pipelines.

python -m bench.peers.litserve_app --port P --runtime torch|onnxruntime|openvino [--precision fp32|bf16]
    [--decoder seed|server] --cache-dir DIR

- `litserve-torch` (bench.run): the seed pipeline, PIL full decode + torchvision + torch eager;
- `litserve-best`: the runtime of the best in-process pipeline on this machine with the server's own
  decoder (`imaging.prepare`: libjpeg-turbo at a DCT scale, uint8, normalization in the graph), so
  that the comparison is of serving, not of pipelines;
- `litserve-onnx` (not in the default set): the seed decode on ONNX Runtime.

POST /predict with multipart field `image` (the same body as the Flask peer and our /v1/predict
multipart row) -> {"predicted_class": N}. LitServe parses multipart in its API process and hands
the form to a worker; the file bytes are read there. No batching (max_batch_size=1), 1 intra-op
thread per worker (2 workers x 1 thread is the best layout on 2 cores); ONNX Runtime and OpenVINO run
the server's export, built as bench.pipelines builds them for one forward at a time per worker.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import litserve as ls

from bench import pipelines


class ClassifierAPI(ls.LitAPI):
    def __init__(self, runtime: str, precision: str, decoder: str, cache_dir: Path | None) -> None:
        super().__init__()
        self.runtime = pipelines.runtime_by_key(f"{runtime}-{precision}")
        self.decoder = decoder
        self.cache_dir = cache_dir

    def setup(self, device: str) -> None:
        onnx_path = pipelines.exported_model(self.cache_dir) if self.runtime.takes_pixels and self.cache_dir else None
        if self.runtime.runtime == "torch" or self.decoder == "seed":
            import torch

            torch.set_num_threads(1)
        self.backend = pipelines.make_backend(self.runtime, onnx_path, threads=1, intra=1)
        if self.decoder == "seed":
            transform = pipelines.seed_transform()
            self.decode = lambda data: pipelines.seed_preprocess(data, transform)[None]
        else:
            self.decode = pipelines.server_prepare

    def decode_request(self, request) -> Any:  # unannotated: LitServe then passes the parsed form
        upload = request["image"]
        data = upload.file.read() if hasattr(upload, "file") else bytes(upload)
        return self.decode(data)

    def predict(self, x: Any) -> int:
        return int(self.backend.forward(x).argmax(axis=1)[0])

    def encode_response(self, output: int) -> dict[str, int]:
        return {"predicted_class": output}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.litserve_app")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--runtime", choices=["torch", "onnxruntime", "openvino"], default="torch")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--decoder", choices=["seed", "server"], default="seed")
    parser.add_argument("--cache-dir", type=Path, help="the server's export cache (ONNX Runtime, OpenVINO)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.runtime == "torch" and args.decoder != "seed":
        parser.error("torch eager runs the seed decoder's float tensors")
    if args.runtime != "torch" and args.cache_dir is None:
        parser.error(f"--runtime {args.runtime} needs --cache-dir")
    api = ClassifierAPI(args.runtime, args.precision, args.decoder, args.cache_dir)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=120)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
