"""Headroom: plan capacities on a step-time model slowed by a margin.

A plan cut to the edge of the SLO fails the first time the hardware runs a little slower than
its perf model. The planner therefore sizes replicas on `Slowed(model, 1 + margin)`: every
step and every request's server overhead takes (1 + margin) x the prediction, and the SLO
must still hold. The margin comes from the perf model's measured prediction error unless the
spec sets `slo.margin`:

- a measured profile: 0.17, the worst |error| of the simulator's p99 TTFT/TPOT against the
  real engine below capacity in the validation that met its goal (benchmarks/validate_perf.py;
  the README's "Closing the loop" tables: held-out replay within 16% at p50 and 10% at p99,
  live run 5 within 9% at p50 and 17% at p99);
- the roofline: 0.25. It is not validated against a GPU serving engine here; its efficiency
  factors (55% of peak FLOP/s in prefill, 80% of HBM bandwidth in decode) are the usual
  calibrated values for vLLM-class engines, which move by about a quarter across engine
  versions and kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PROFILE_MARGIN = 0.17
ROOFLINE_MARGIN = 0.25


def default_margin(source: str) -> float:
    """The margin for a perf model by its source ("roofline" | "profile:<file>")."""
    return PROFILE_MARGIN if source.startswith("profile") else ROOFLINE_MARGIN


def plan_margin(setting: float | str, source: str) -> float:
    """The spec's `slo.margin` ("auto" or a fraction) for a perf model of this source."""
    return default_margin(source) if setting == "auto" else float(setting)


@dataclass(frozen=True)
class Slowed:
    """A step-time model whose steps and request overheads all take `factor` x as long."""

    model: Any  # a StepTimeModel
    factor: float

    @property
    def source(self) -> str:
        return self.model.source

    @property
    def cache_key(self) -> list:
        from skybroker.perf.capacity import _digest

        return ["slowed", _digest(self.model), self.factor]

    def step_time(self, num_prefill_tokens: float, num_decode_seqs: float,
                  total_context_tokens: float, prefill_attn_pairs: float = 0.0) -> float:  # fmt: skip
        return self.factor * self.model.step_time(
            num_prefill_tokens, num_decode_seqs, total_context_tokens, prefill_attn_pairs
        )

    def fast_step(self) -> Callable[[float, float, float, float], float]:
        from skybroker.perf.simulator import step_fn

        inner, f = step_fn(self.model), self.factor

        def step(p: float, d: float, c: float, pairs: float = 0.0) -> float:
            return f * inner(p, d, c, pairs)

        return step

    @property
    def request_overhead_s(self) -> float:
        return self.factor * float(getattr(self.model, "request_overhead_s", 0.0))

    @property
    def busy_request_overhead_s(self) -> float:
        inner = getattr(self.model, "busy_request_overhead_s", None)
        return self.request_overhead_s if inner is None else self.factor * float(inner)

    @property
    def step_noise(self) -> Any:
        return getattr(self.model, "step_noise", None)

    @property
    def served_factors(self) -> Any:
        return getattr(self.model, "served_factors", None)


def slowed(model: Any, margin: float) -> Any:
    """`model` slowed by 1 + margin (itself when the margin is 0)."""
    return Slowed(model, 1.0 + margin) if margin > 0 else model
