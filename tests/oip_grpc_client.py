"""Runs tritonclient.grpc steps against a server and prints one JSON result per step.

The tests run it in a child process: tritonclient.grpc's generated messages and the server's claim
the same protobuf names (`inference.*`) in the default descriptor pool, so one process cannot hold
both. Usage: python -m tests.oip_grpc_client HOST:PORT STEPS.json [ROOT_CERT.pem]  (a list of steps, see
`run_step`; with a PEM certificate to trust, the client connects over TLS).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def run_step(client: grpcclient.InferenceServerClient, step: dict[str, Any]) -> Any:
    op = step["op"]
    headers = {"authorization": step["authorization"]} if step.get("authorization") else None
    if op == "live":
        return client.is_server_live()
    if op == "ready":
        return client.is_server_ready()
    if op == "model_ready":
        return client.is_model_ready(step["model"], step.get("version", ""))
    if op == "server_metadata":
        return client.get_server_metadata(as_json=True)
    if op == "model_metadata":
        return client.get_model_metadata(step["model"], step.get("version", ""), as_json=True)
    if op == "infer":
        spec = step["input"]
        if "files" in spec:  # BYTES: the files' bytes, one element each
            data = np.array([Path(path).read_bytes() for path in spec["files"]], dtype=np.object_)
        elif "npy" in spec:
            data = np.load(spec["npy"])
        else:
            data = np.array(spec["values"], dtype=spec.get("dtype", "float32"))
        data = data.reshape(spec.get("shape", data.shape))
        tensor = grpcclient.InferInput(spec["name"], list(spec.get("declared_shape", data.shape)), spec["datatype"])
        tensor.set_data_from_numpy(data)
        outputs = [grpcclient.InferRequestedOutput(o["name"], class_count=o.get("class_count", 0))
                   for o in step.get("outputs", [])]
        result = client.infer(step.get("model", "efficientnet_lite0"), [tensor], model_version=step.get("version", ""),
                              outputs=outputs or None, request_id=step.get("id", ""), headers=headers)
        response = result.get_response(as_json=True)
        values = {}
        for output in response["outputs"]:
            array = result.as_numpy(output["name"])
            data = [v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()]
            values[output["name"]] = {"shape": list(array.shape), "datatype": output["datatype"], "data": data}
        return {"id": response.get("id", ""), "model_version": response.get("model_version", ""), "outputs": values}
    raise ValueError(f"unknown step {op!r}")


def main() -> int:
    address, steps_file = sys.argv[1], sys.argv[2]
    root_certificates = sys.argv[3] if len(sys.argv) > 3 else None
    results = []
    with grpcclient.InferenceServerClient(address, ssl=root_certificates is not None,
                                          root_certificates=root_certificates) as client:
        for step in json.loads(Path(steps_file).read_text()):
            try:
                results.append({"ok": True, "value": run_step(client, step)})
            except InferenceServerException as exc:
                results.append({"ok": False, "status": exc.status(), "message": exc.message()})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
