"""The last stage of the pipeline: class probabilities into the best classes, labelled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClassScore:
    class_index: int
    label: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"class_index": self.class_index, "label": self.label, "score": self.score}


def top_k(probabilities: np.ndarray, k: int, labels: list[str]) -> list[ClassScore]:
    """The `k` best classes of one probability row, best first (scores rounded like every answer)."""
    k = min(k, probabilities.shape[-1])
    best = np.argpartition(probabilities, -k)[-k:]
    best = best[np.argsort(probabilities[best])[::-1]]
    return [ClassScore(int(i), labels[i], round(float(probabilities[i]), 6)) for i in best]
