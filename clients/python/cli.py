"""The command line: `python -m clients.python` or, installed, `inference-client`.

    inference-client predict tests/data/cat.jpg tests/data/coffee.jpg --top-k 3
    inference-client models
    inference-client predict tests/data/cat.jpg --model shapes
    TOKEN=$(inference-client login --model shapes)
    inference-client labels --token "$TOKEN"
    inference-client history --token "$TOKEN" --limit 10
    inference-client predict tests/data/cat.jpg --json
    inference-client feedback 1733061234567-0 "tiger cat" --token "$TOKEN" --comment "stripes"
    INFERENCE_ADMIN_KEY=... inference-client export feedback.tar --since 2026-11-01T00:00:00Z

Exit status: 0 done, 1 the server refused or could not be reached (`error: <code>: <message>` on
stderr), 2 a usage error (bad arguments, an image file that cannot be read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from clients.python.client import Client
from clients.python.errors import InferenceError
from clients.python.protocol import DEFAULT_URL, EXPORT_FORMATS, default_model

OK, FAILED, USAGE = 0, 1, 2
ADMIN_KEY_VARIABLE = "INFERENCE_ADMIN_KEY"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help (0) and on bad arguments (2)
        return exit_.code if isinstance(exit_.code, int) else USAGE
    try:
        return args.run(args)
    except InferenceError as error:
        print(f"error: {error.code}: {error.message}", file=sys.stderr)
        return FAILED
    except (OSError, ValueError, TypeError) as error:  # the image could not be read or is no image
        print(f"error: {error}", file=sys.stderr)
        return USAGE


def build_parser() -> argparse.ArgumentParser:
    # The connection options sit on each subcommand, so they can follow it: `predict x.jpg --url U`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=DEFAULT_URL, help=f"server address (default {DEFAULT_URL})")
    common.add_argument("--token", type=_non_empty, help="use this existing session instead of logging in")
    common.add_argument("--api-key", help="API key for logging in, where the server requires one")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    common.add_argument("--json", action="store_true", help="print the server's JSON, one object per line")

    parser = argparse.ArgumentParser(prog="inference-client",
                                     description="Classify images with the session-aware inference server.")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{login,predict,models,labels,history,feedback,export}")

    login = commands.add_parser("login", parents=[common], help="open a session and print its token",
                                description="Open a session (with its model, if given) and print its token "
                                            "for --token; --json prints the whole answer.")
    login.add_argument("--model", type=_non_empty, metavar="NAME",
                       help="the session's model (see `models`; default: the server's default model)")
    login.add_argument("--top-k", type=int, metavar="N", help="how many classes each prediction gives (1-20)")
    login.set_defaults(run=run_login)

    predict = commands.add_parser("predict", parents=[common], help="classify images",
                                  description="Log in (unless --token), classify each image, print its top classes.")
    predict.add_argument("images", nargs="+", metavar="IMG", help="JPEG, PNG, WebP, GIF or BMP file")
    predict.add_argument("--top-k", type=int, metavar="N", help="how many classes to show (1-20)")
    predict.add_argument("--model", type=_non_empty, metavar="NAME",
                         help="classify with this model (see `models`; default: the session's model)")
    predict.add_argument("--keep-session", action="store_true",
                         help="do not log out afterwards; print the token (for --token) on stderr")
    predict.set_defaults(run=run_predict)

    models = commands.add_parser("models", parents=[common], help="list the served models",
                                 description="List the served models: name, whether it is the default, its "
                                             "class count and active version.")
    models.set_defaults(run=run_models)

    labels = commands.add_parser("labels", parents=[common], help="list a model's class labels",
                                 description="List a model's class labels, by class index: what `feedback` takes "
                                             "for that model's predictions.")
    labels.add_argument("model", nargs="?", type=_non_empty, metavar="MODEL",
                        help="the model (default: the session's model with --token, else the server's default)")
    labels.set_defaults(run=run_labels)

    history = commands.add_parser("history", parents=[common], help="list a session's predictions",
                                  description="List a session's predictions, newest first (needs --token).")
    history.add_argument("--limit", type=int, metavar="N", help="show at most N (default: all)")
    history.set_defaults(run=run_history)

    feedback = commands.add_parser("feedback", parents=[common], help="correct a prediction's label",
                                   description="Give the right label for one of a session's predictions "
                                               "(needs --token: the session that made it).")
    feedback.add_argument("id", type=_non_empty, metavar="ID", help="the history id of the prediction")
    feedback.add_argument("label", type=_non_empty, metavar="LABEL",
                          help="a class index or a label name of the prediction's model, e.g. 'tiger cat' "
                               "(`labels MODEL` lists them)")
    feedback.add_argument("--comment", metavar="TEXT", help="a note for whoever trains the next version")
    feedback.set_defaults(run=run_feedback)

    export = commands.add_parser("export", parents=[common], help="download the training export (admin)",
                                 description="Download the corrected predictions as a WebDataset tar (or JSON "
                                             "lines) for training: GET /v1/feedback/export, with an admin key.")
    export.add_argument("out", metavar="OUT", help="the file to write ('-': standard output)")
    export.add_argument("--admin-key", default=os.environ.get(ADMIN_KEY_VARIABLE),
                        help="a key listed (hashed) in the server's auth.admin_api_keys "
                             f"(default: ${ADMIN_KEY_VARIABLE}, which keeps it out of the process list)")
    export.add_argument("--since", metavar="TIME", help="feedback from this time on (ISO 8601 or epoch ms)")
    export.add_argument("--until", metavar="TIME", help="feedback before this time (ISO 8601 or epoch ms)")
    export.add_argument("--model-version", metavar="V", help="only predictions of this model version")
    export.add_argument("--format", dest="export_format", choices=EXPORT_FORMATS, default="tar",
                        help="tar: a WebDataset, each item's JSON, class and image (default); jsonl: the JSON alone")
    export.set_defaults(run=run_export)
    return parser


def _non_empty(text: str) -> str:
    """An id, label or token argument: an empty one (an unset shell variable, "$ID") is a usage error
    before anything is sent, not a request for the wrong thing."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (is the shell variable it came from set?)")
    return text


def run_login(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        options = {"top_k": args.top_k} if args.top_k is not None else None
        result = client.login(args.api_key, options, model=args.model)
        if args.json:
            _print_json(result)
        else:
            print(result["token"])
    finally:
        client.close()  # the session stays open: its token was the point
    return OK


def run_predict(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        if not args.token:
            client.login(args.api_key)
        for index, path in enumerate(args.images):
            result = client.predict(path, top_k=args.top_k, model=args.model)
            if args.json:
                _print_json(result)
            else:
                if index:
                    print()
                print_prediction(path, result)
        if args.keep_session and not args.token:
            print(f"session token (pass it as --token): {client.token}", file=sys.stderr)
    finally:
        _finish(client, logout=not args.token and not args.keep_session)
    return OK


def run_models(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        if not args.token:
            client.login(args.api_key)
        listing = client.models()
        if args.json:
            _print_json(listing)
        else:
            print_models(listing)
    finally:
        _finish(client, logout=not args.token)
    return OK


def run_labels(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        if not args.token:
            client.login(args.api_key)  # a new session runs the default model
        answer = client.model_labels(args.model)
        if args.json:
            _print_json(answer)
        else:
            print(f"{answer['name']} (version {answer['version']}): {len(answer['labels'])} classes")
            print_table(("class", "label"), ((str(index), label) for index, label in enumerate(answer["labels"])),
                        right=(0,))
    finally:
        _finish(client, logout=not args.token)
    return OK


def run_history(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        if not args.token:
            # Without a token there is no earlier session to read: a new one's history is empty.
            client.login(args.api_key)
        items = list(client.history(args.limit))
        if args.json:
            for item in items:
                _print_json(item)
        elif items:
            print_history(items)
        elif args.token:
            print("This session has no predictions yet.")
        else:
            print("No history: this is a new session. Pass --token to read an existing session's history.")
    finally:
        _finish(client, logout=not args.token)
    return OK


def run_feedback(args: argparse.Namespace) -> int:
    if not args.token:
        # A prediction belongs to the session that made it; a new session owns none.
        print("error: feedback needs --token, the session that made the prediction", file=sys.stderr)
        return USAGE
    client = _client(args)
    try:
        item = client.feedback(args.id, feedback_label(args.label), args.comment)
        if args.json:
            _print_json(item)
        else:
            given = item["feedback"]
            print(f"{item['id']}: predicted {item['label']} (class {item['predicted_class']}), "
                  f"corrected to {given['label']} (class {given['class_index']})")
    finally:
        client.close()
    return OK


def run_export(args: argparse.Namespace) -> int:
    if not args.admin_key:
        print(f"error: export needs an admin key: --admin-key or ${ADMIN_KEY_VARIABLE}", file=sys.stderr)
        return USAGE
    client = _client(args)
    try:
        written = client.export_feedback(sys.stdout.buffer if args.out == "-" else args.out,
                                         admin_key=args.admin_key, since=args.since, until=args.until,
                                         model_version=args.model_version, export_format=args.export_format)
    finally:
        client.close()
    if args.out != "-":
        print(f"wrote {written} bytes to {args.out}", file=sys.stderr)
    return OK


def feedback_label(text: str) -> int | str:
    """A LABEL argument: digits are a class index, anything else a label name."""
    stripped = text.strip()
    return int(stripped) if stripped.isdigit() else text


def print_prediction(image: str, result: dict[str, Any], out: TextIO | None = None) -> None:
    print(f"{image}: {result['label']} (class {result['predicted_class']})", file=out)
    rows = [(str(rank), item["label"], _percent(item["score"])) for rank, item in enumerate(result["top_k"], 1)]
    print_table(("rank", "label", "score"), rows, right=(0, 2), out=out)


def print_history(items: list[dict[str, Any]], out: TextIO | None = None) -> None:
    """One row per item; a model column where the items come from more than one model."""
    models = {item.get("model", {}).get("name") for item in items}
    rows: list[tuple[str, ...]] = [(item["id"], item["created_at"], item["label"], _percent(item["top_k"][0]["score"]))
                                   for item in items]
    header: tuple[str, ...] = ("id", "created", "label", "score")
    if len(models) > 1:
        header += ("model",)
        rows = [(*row, str(item.get("model", {}).get("name"))) for row, item in zip(rows, items, strict=True)]
    print_table(header, rows, right=(3,), out=out)


def print_models(listing: dict[str, Any], out: TextIO | None = None) -> None:
    """Each served model: its name (* marks the default), class count and active version."""
    default = default_model(listing)
    rows = [(model["name"] + (" *" if model["name"] == default else ""),
             str(model.get("classes", "")), str(model.get("active_version") or model.get("serving_version") or ""),
             model.get("description") or "")
            for model in listing["models"]]
    print_table(("model", "classes", "version", "description"), rows, right=(1,), out=out)
    print("* the default model (a session without the model option runs it)", file=out)


def print_table(header: Sequence[str], rows: Iterable[Sequence[str]], *, right: Sequence[int] = (),
                out: TextIO | None = None) -> None:
    """Columns padded to their widest cell, two spaces apart; numbers right-aligned."""
    table = [list(header), *map(list, rows)]
    widths = [max(len(row[column]) for row in table) for column in range(len(header))]
    for row in table:
        cells = [cell.rjust(width) if column in right else cell.ljust(width)
                 for column, (cell, width) in enumerate(zip(row, widths, strict=True))]
        print("  " + "  ".join(cells).rstrip(), file=out)


def _percent(score: float) -> str:
    return f"{100 * score:.2f}%"


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, ensure_ascii=False))


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, token=args.token, timeout=args.timeout)


def _finish(client: Client, *, logout: bool) -> None:
    """Close the client, first logging out of a session this run made (best effort)."""
    try:
        if logout and client.token:
            client.logout()
    except InferenceError:
        pass
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
