"""Triton's own counters, read from its Prometheus metrics page.

`inference_counts(metrics_url, model)` sums, over the model's versions,
`nv_inference_count` (images inferred: batch elements), `nv_inference_exec_count` (model
executions: batches after Triton's dynamic batcher) and `nv_inference_request_success`
(requests). The batch size Triton achieved over a run is the ratio of the deltas of the first
two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

_LINE = re.compile(r"^(nv_inference_\w+)\{([^}]*)\}\s+([0-9.eE+-]+)$")


@dataclass(frozen=True)
class InferenceCounts:
    images: float = 0.0
    executions: float = 0.0
    requests: float = 0.0

    def __sub__(self, other: InferenceCounts) -> InferenceCounts:
        return InferenceCounts(
            self.images - other.images,
            self.executions - other.executions,
            self.requests - other.requests,
        )

    @property
    def batch_size(self) -> float:
        """Images per model execution (0 when nothing ran)."""
        return self.images / self.executions if self.executions else 0.0

    @property
    def request_size(self) -> float:
        """Images per request as the client sent them (0 when nothing ran)."""
        return self.images / self.requests if self.requests else 0.0


def parse(text: str, model: str) -> InferenceCounts:
    totals = {"images": 0.0, "executions": 0.0, "requests": 0.0}
    names = {
        "nv_inference_count": "images",
        "nv_inference_exec_count": "executions",
        "nv_inference_request_success": "requests",
    }
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None or match.group(1) not in names:
            continue
        if f'model="{model}"' not in match.group(2):
            continue
        totals[names[match.group(1)]] += float(match.group(3))
    return InferenceCounts(**totals)


def inference_counts(metrics_url: str, model: str = "category_classifier") -> InferenceCounts:
    response = httpx.get(metrics_url, timeout=5.0)
    response.raise_for_status()
    return parse(response.text, model)
