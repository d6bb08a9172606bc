"""`POST /v1/preprocess`: the tensor the model would see, without running the model.

Useful for debugging a client's own pipeline against the server's and for feeding the server's
preprocessing into a model run elsewhere. Nothing is recorded in the history, but it costs what a
predict costs to decode and preprocess: it takes one from the session's rate limit and is admitted
by the runner like a predict.
"""

from __future__ import annotations

import base64
import io

import numpy as np

from handlers.predict import ImageUploadHandler

NPY_MEDIA_TYPE = "application/x-npy"
JSON_MEDIA_TYPE = "application/json"


def wants_json(accept: str) -> bool:
    """True when the Accept header prefers JSON over .npy (the default when both or neither are named)."""
    quality: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (item.strip() for item in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media.lower()] = max(q, quality.get(media.lower(), 0.0))
    return quality.get(JSON_MEDIA_TYPE, 0.0) > quality.get(NPY_MEDIA_TYPE, 0.0)


def npy_bytes(array: np.ndarray) -> bytes:
    """The array in NumPy's .npy format (version 1.0 header: dtype, shape, C order, then the data)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class PreprocessHandler(ImageUploadHandler):
    """POST /v1/preprocess: same inputs as /v1/predict; `.npy` back, or JSON with `Accept: application/json`."""

    rate_limit_cost = 1

    async def post(self) -> None:
        image = self.uploaded_image()
        options = self.options_with_query()
        tensor = await self.preprocessor.preprocess(image, options)
        self.add_header("Vary", "Accept")
        if wants_json(self.request.headers.get("Accept", "")):
            self.write_json({
                "dtype": "float32",
                "byte_order": "little",
                "shape": list(tensor.shape),
                "data": base64.b64encode(np.ascontiguousarray(tensor).tobytes()).decode("ascii"),
                "options": options.to_dict(),
            })
            return
        self.set_header("Content-Type", NPY_MEDIA_TYPE)
        self.finish(npy_bytes(tensor))
