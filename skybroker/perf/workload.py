"""Request lengths of a workload, sampled and split into request-size classes.

Lengths come from the spec: a mean with percentiles (fitted as a log-normal), a histogram of
(tokens, weight), or a JSONL trace of {"input_tokens": .., "output_tokens": ..}. The samples
are binned on a 2-D grid of input x output lengths (Mélange-style); bins with under
`min_share` of the requests are folded into the nearest kept bin. Each class keeps its own
samples: the simulation of a replica serving that class replays them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skybroker.spec import LengthDist, Workload

INPUT_EDGES = (256, 1024, 4096, 16384)
OUTPUT_EDGES = (128, 512, 2048)
_Z = {50: 0.0, 90: 1.2816, 99: 2.3263}


@dataclass(frozen=True, slots=True)
class RequestClass:
    """Requests of similar size: their share of the rate and their sampled lengths."""

    name: str  # e.g. "in<1024,out<512"
    share: float
    input_lens: tuple[int, ...]
    output_lens: tuple[int, ...]

    @property
    def mean_input(self) -> float:
        return float(np.mean(self.input_lens))

    @property
    def mean_output(self) -> float:
        return float(np.mean(self.output_lens))


def sample_lengths(dist: LengthDist, n: int, rng: np.random.Generator) -> np.ndarray:
    """n token lengths (ints >= 1) drawn from a length distribution."""
    if dist.histogram is not None:
        vals = np.array([t for t, _ in dist.histogram], dtype=np.int64)
        w = np.array([w for _, w in dist.histogram], dtype=float)
        return rng.choice(vals, size=n, p=w / w.sum())
    median = dist.p50 if dist.p50 is not None else dist.mean
    assert median is not None
    sigma = 0.0
    for p, q in ((99, dist.p99), (90, dist.p90)):
        if q is not None and q > median:
            sigma = math.log(q / median) / _Z[p]
            break
    else:
        if dist.mean is not None and dist.p50 is not None and dist.mean > dist.p50:
            sigma = math.sqrt(2 * math.log(dist.mean / dist.p50))
    x = np.exp(math.log(median) + sigma * rng.standard_normal(n))
    if dist.max is not None:
        x = np.minimum(x, dist.max)
    return np.maximum(np.rint(x), 1).astype(np.int64)


def read_trace(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    ins, outs = [], []
    for lineno, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ins.append(int(rec["input_tokens"]))
            outs.append(int(rec["output_tokens"]))
        except (ValueError, KeyError, TypeError):  # the line itself is not quoted: any file
            raise ValueError(
                f"{path}:{lineno}: not a JSON object with integer input_tokens and output_tokens"
            ) from None
    if not ins:
        raise ValueError(f"trace {path} has no requests")
    return np.maximum(np.array(ins), 1), np.maximum(np.array(outs), 1)


def workload_samples(w: Workload, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if w.trace:
        return read_trace(w.trace)
    rng = np.random.default_rng(seed)
    return sample_lengths(w.input_tokens, n, rng), sample_lengths(w.output_tokens, n, rng)


def _label(i: int, edges: tuple[int, ...], what: str) -> str:
    return f"{what}<{edges[i]}" if i < len(edges) else f"{what}>={edges[-1]}"


def request_classes(ins: np.ndarray, outs: np.ndarray, min_share: float = 0.02,
                    max_samples: int = 512) -> list[RequestClass]:  # fmt: skip
    """Split (input, output) samples into size classes; shares sum to 1."""
    bi = np.searchsorted(INPUT_EDGES, ins, side="right")
    bo = np.searchsorted(OUTPUT_EDGES, outs, side="right")
    cells, counts = np.unique(np.stack([bi, bo], 1), axis=0, return_counts=True)
    keep = [tuple(c) for c, k in zip(cells, counts, strict=True) if k >= min_share * len(ins)]
    if not keep:
        keep = [tuple(cells[np.argmax(counts)])]
    kept = np.array(keep)
    # fold each sample into the nearest kept cell (grid distance)
    d = np.abs(bi[:, None] - kept[None, :, 0]) + np.abs(bo[:, None] - kept[None, :, 1])
    owner = np.argmin(d, axis=1)
    classes = []
    for j, (ci, co) in enumerate(keep):
        m = owner == j
        idx = np.flatnonzero(m)[:max_samples]
        name = f"{_label(ci, INPUT_EDGES, 'in')},{_label(co, OUTPUT_EDGES, 'out')}"
        classes.append(RequestClass(name, float(m.mean()), tuple(int(x) for x in ins[idx]),
                                    tuple(int(x) for x in outs[idx])))  # fmt: skip
    return classes
