"""From serving back to training, in one small script (see docs/training-loop.md).

    .venv/bin/python docs/examples/train_from_feedback.py --url http://127.0.0.1:8000 \
        --admin-key "$ADMIN_KEY" --version fb-2026-12-01 --canary-percent 10

1. downloads the corrected predictions: GET /v1/feedback/export, a WebDataset tar of `<key>.json`
   (the prediction, the corrected label, the options it was made under) and `<key>.<ext>` (the
   captured image, where capture was on), streamed to a file by `Client.export_feedback`;
2. fine-tunes the classifier's last layer (EfficientNet-Lite0's `_fc`) for one epoch on the images
   that have a correction, each preprocessed exactly as serving preprocessed it (the project's own
   `inference.imaging.preprocess`, under the options the record names);
3. publishes the new state_dict: PUT /v1/models/<name>/versions/<version> with its SHA-256;
4. starts it as a canary: POST .../versions/<version>:activate {"traffic_percent": 10}.

Torch runs here, in the training job, never in a serving process. It reads the tar with the
standard library's tarfile; the `webdataset` package reads the same file
(`webdataset.WebDataset(path).decode("pil")`) where it is installed.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.python import Client, InferenceError

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "gif", "bmp"}


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    class_index: int  # the corrected label: the target
    label: str  # the corrected label's text (a new model's classes are these)
    options: dict[str, Any]  # the options the prediction was made under
    model: dict[str, str]  # {name, version} that made the prediction


def read_samples(path: Path) -> tuple[list[Sample], int]:
    """The samples of a WebDataset tar (members grouped by key: the name up to its first dot), and
    how many records had no image (capture was off when they were predicted)."""
    records: dict[str, dict[str, Any]] = {}
    images: dict[str, bytes] = {}
    with tarfile.open(path, mode="r|*") as tar:  # a stream: one pass, members in order
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, extension = name.partition(".")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if extension == "json":
                records[key] = json.loads(data)
            elif extension.lower() in IMAGE_EXTENSIONS:
                images[key] = data
    samples = [Sample(key, images[key], record["feedback"]["class_index"], record["feedback"]["label"],
                      record["options"], record["model"]) for key, record in records.items() if key in images]
    return samples, len(records) - len(samples)


def batches(samples: list[Sample], size: int, seed: int) -> Iterator[list[Sample]]:
    import random

    order = list(samples)
    random.Random(seed).shuffle(order)
    for start in range(0, len(order), size):
        yield order[start : start + size]


def fine_tune_last_layer(samples: list[Sample], *, base_weights: str, model_name: str, epochs: int = 1,
                         learning_rate: float = 0.01, batch_size: int = 16, seed: int = 0) -> tuple[bytes, float]:
    """One epoch (by default) of SGD on the last layer alone, the rest frozen and in eval mode (no
    batch-norm statistics change). Returns the whole state_dict as `torch.save` bytes, the format
    PUT /v1/models/<name>/versions/<v> takes, and the last batch's loss."""
    import torch

    from core.options import Options
    from inference.imaging import preprocess
    from inference.torch_model import load_model
    from server.config import Config

    torch.manual_seed(seed)
    model = load_model(model_name, base_weights).module  # the architecture exactly as the server builds it
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    head = model._fc  # EfficientNet-Lite0's classifier: Linear(1280, 1000)
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.SGD(head.parameters(), lr=learning_rate, momentum=0.9)
    max_pixels = Config().model.max_image_pixels
    loss = float("nan")
    for epoch in range(epochs):
        for batch in batches(samples, batch_size, seed + epoch):
            # Each image under the options it was served with: training sees what serving saw. Images
            # in one batch may have different crops, so each goes through the model on its own.
            logits = torch.cat([model(torch.from_numpy(preprocess(
                sample.image, Options().merged({k: v for k, v in sample.options.items() if k != "model_version"}),
                max_pixels=max_pixels))[None]) for sample in batch])
            targets = torch.tensor([sample.class_index for sample in batch])
            step_loss = torch.nn.functional.cross_entropy(logits, targets)
            optimizer.zero_grad()
            step_loss.backward()
            optimizer.step()
            loss = float(step_loss)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue(), loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fine-tune on users' corrections, publish, start a canary.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    parser.add_argument("--admin-key", required=True, help="a key listed (hashed) in auth.admin_api_keys")
    parser.add_argument("--version", required=True, help="the new version's name (1-64 of A-Za-z0-9._-)")
    parser.add_argument("--canary-percent", type=int, default=10,
                        help="share of sessions the new version serves (1-100; 100: everyone)")
    parser.add_argument("--since", help="export filter: feedback from this time on (ISO 8601)")
    parser.add_argument("--until", help="export filter: feedback before this time (ISO 8601)")
    parser.add_argument("--model-version", help="export filter: only predictions of this model version")
    parser.add_argument("--base-weights", default="default",
                        help="weights to start from: 'default' (the packaged ImageNet ones) or a state_dict file")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--keep-export", type=Path, help="also keep the downloaded tar here")
    args = parser.parse_args(argv)

    with Client(args.url, timeout=600.0) as client:
        with tempfile.TemporaryDirectory(prefix="feedback-export-") as scratch:
            tar_path = args.keep_export or Path(scratch) / "feedback.tar"
            try:  # streamed to the file, never whole in memory
                client.export_feedback(tar_path, admin_key=args.admin_key, since=args.since, until=args.until,
                                       model_version=args.model_version)
            except InferenceError as error:
                print(f"export refused: {error.code}: {error.message}", file=sys.stderr)
                return 1
            samples, without_image = read_samples(tar_path)
        print(f"export: {len(samples)} corrected predictions with their image, {without_image} without "
              "(not captured)")
        if not samples:
            print("nothing to train on: turn capture on ([capture] enabled = true) and collect feedback first",
                  file=sys.stderr)
            return 1
        model_name = client.models(args.admin_key)["models"][0]["name"]
        weights, loss = fine_tune_last_layer(samples, base_weights=args.base_weights, model_name=model_name,
                                             epochs=args.epochs, learning_rate=args.learning_rate)
        print(f"trained {model_name}'s last layer for {args.epochs} epoch(s); last loss {loss:.4f}")
        try:
            published = client.publish_version(model_name, args.version, weights, admin_key=args.admin_key)
            print(f"published {model_name} {published['version']} ({published['size']} bytes)")
            client.activate_version(model_name, args.version, admin_key=args.admin_key,
                                    traffic_percent=args.canary_percent)
        except InferenceError as error:
            print(f"error: {error.code}: {error.message}", file=sys.stderr)
            return 1
    print(f"{args.version} now serves {args.canary_percent}% of sessions; watch its feedback agreement in "
          f"GET /v1/models, then activate it with traffic_percent 100 (or the previous version to roll back)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
