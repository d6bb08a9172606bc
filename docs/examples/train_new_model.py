"""From users' corrections to a NEW model with its own classes (see docs/training-loop.md, "A new model").

    .venv/bin/python docs/examples/train_new_model.py --url http://127.0.0.1:8000 \
        --admin-key "$ADMIN_KEY" --name my-classes --version v2 --canary-percent 20

1. downloads the corrected predictions (GET /v1/feedback/export, format=tar) and takes the distinct
   corrected labels as the new model's classes, in sorted order;
2. trains a new head for them: EfficientNet-Lite0's features frozen (the packaged ImageNet weights, exactly
   as the server builds the model), a new `_fc` of one output per class, a few epochs on the exported
   images, each preprocessed as serving preprocessed it;
3. writes the model's folder (model.toml, labels.txt, weights.pt) and publishes it as a new model:
   PUT /v1/models/<name> with the folder as a gzip tar and its SHA-256;
4. trains the head further and publishes that as a version of the new model
   (PUT /v1/models/<name>/versions/<version>), then starts it as a canary (POST ...:activate
   {"traffic_percent": N});
5. logs in a session that chooses the new model (option `model`) and predicts an exported image with it.

Torch runs here, in the training job; the server gets files only.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

from train_from_feedback import Sample, read_samples  # the first example, beside this file

from clients.python import Client, InferenceError

ARCHITECTURE = "efficientnet_lite0"


def features_of(samples: list[Sample]) -> tuple[Any, Any]:
    """The frozen model with its classifier removed (what the new head sits on), and each sample's features:
    computed once, since nothing below the head trains."""
    import torch

    from core.options import Options
    from inference.imaging import preprocess
    from inference.torch_model import load_model
    from server.config import Config

    model = load_model(ARCHITECTURE, "default").module  # the architecture exactly as the server builds it
    model.eval()
    model._fc = torch.nn.Identity()  # its 1280 pooled features, not the 1000 ImageNet classes
    max_pixels = Config().model.max_image_pixels
    with torch.no_grad():  # plain tensors: the head's training takes them
        features = torch.cat([model(torch.from_numpy(preprocess(
            sample.image, Options().merged({k: v for k, v in sample.options.items()
                                            if k not in ("model", "model_version")}),
            max_pixels=max_pixels))[None]) for sample in samples])
    return model, features


def train_head(head: Any, features: Any, targets: Any, *, epochs: int, learning_rate: float) -> float:
    """`epochs` of full-batch SGD on the head alone; the last loss."""
    import torch

    optimizer = torch.optim.SGD(head.parameters(), lr=learning_rate, momentum=0.9)
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(head(features), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss)


def state_dict_bytes(model: Any, head: Any) -> bytes:
    """The whole model's state_dict with `head` as its classifier, as `torch.save` bytes."""
    import copy

    import torch

    whole = copy.deepcopy(model)
    whole._fc = copy.deepcopy(head)
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    return buffer.getvalue()


def write_folder(folder: Path, labels: list[str], weights: bytes, version: str) -> Path:
    """The model's folder as a model repository holds it (docs/models.md)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    (folder / "weights.pt").write_bytes(weights)
    (folder / "model.toml").write_text(
        f'format = "torchvision"\narchitecture = "{ARCHITECTURE}"\nfile = "weights.pt"\nlabels = "labels.txt"\n'
        f'version = "{version}"\ndescription = "{len(labels)} classes learned from users\' corrections"\n',
        encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a new model on users' corrections and publish it.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    parser.add_argument("--admin-key", required=True, help="a key listed (hashed) in auth.admin_api_keys")
    parser.add_argument("--name", required=True, help="the new model's name (1-64 of A-Za-z0-9._-)")
    parser.add_argument("--first-version", default="v1", help="the version name of the model's own file")
    parser.add_argument("--version", default="v2", help="the version trained further, started as a canary")
    parser.add_argument("--canary-percent", type=int, default=20, help="share of the model's sessions it serves")
    parser.add_argument("--epochs", type=int, default=30, help="epochs for the first head (the second: as many more)")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--keep-folder", type=Path, help="write the model's folder here (else a temporary one)")
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(0)
    with Client(args.url, timeout=600.0) as client, tempfile.TemporaryDirectory(prefix="new-model-") as scratch:
        try:
            client.export_feedback(Path(scratch) / "feedback.tar", admin_key=args.admin_key)  # format=tar
        except InferenceError as error:
            print(f"export refused: {error.code}: {error.message}", file=sys.stderr)
            return 1
        samples, _ = read_samples(Path(scratch) / "feedback.tar")
        labels = sorted({sample.label for sample in samples})
        if len(labels) < 2:
            print("a new model needs corrections naming at least 2 labels, with their images (capture on)",
                  file=sys.stderr)
            return 1
        print(f"export: {len(samples)} corrected images naming {len(labels)} classes: {', '.join(labels)}")

        model, features = features_of(samples)
        targets = torch.tensor([labels.index(sample.label) for sample in samples])
        head = torch.nn.Linear(features.shape[1], len(labels))  # the new _fc: one output per class
        loss = train_head(head, features, targets, epochs=args.epochs, learning_rate=args.learning_rate)
        print(f"trained a new {len(labels)}-class head for {args.epochs} epochs; last loss {loss:.4f}")
        folder = write_folder(args.keep_folder or Path(scratch) / args.name, labels,
                              state_dict_bytes(model, head), args.first_version)
        try:
            added = client.add_model(args.name, folder, admin_key=args.admin_key)  # the folder as a gzip tar
            print(f"added model {added['name']} ({added['classes']} classes, version {added['serving_version']})")

            loss = train_head(head, features, targets, epochs=args.epochs, learning_rate=args.learning_rate)
            print(f"trained {args.epochs} more epochs; last loss {loss:.4f}")
            published = client.publish_version(args.name, args.version, state_dict_bytes(model, head),
                                               admin_key=args.admin_key)
            print(f"published {args.name} {published['version']} ({published['size']} bytes)")
            client.activate_version(args.name, args.version, admin_key=args.admin_key,
                                    traffic_percent=args.canary_percent)
            print(f"{args.version} now serves {args.canary_percent}% of {args.name}'s sessions")

            client.login(model=args.name)  # a session that chooses the new model
            result = client.predict(samples[0].image)
            best = result["top_k"][0]
            print(f"a session of {args.name} ({result['model']['version']}) says {best['label']!r} "
                  f"({best['score']:.2f}) for an image corrected to {samples[0].label!r}")
        except InferenceError as error:
            print(f"error: {error.code}: {error.message}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
