"""Measured engine profiles: step times of the real engine that override the roofline.

The engine's profiler (`python -m engine.profile`, `skybroker profile`) writes one JSON file
per (hardware, model); the planner reads every file named in the spec's `engine.profiles`, in
`$SKYBROKER_HOME/profiles/*.json` and the project's bundled `catalogs/profiles/*.json`, and
uses the first whose hardware and model match a replica instead of the roofline. A profile
named in the spec that does not match (or a found one for the same model and device kind
measured on other hardware) is skipped with a note saying why.

Schema (version "skybroker-engine-profile/1"):

    {
      "schema": "skybroker-engine-profile/1",
      "hardware": {"kind": "gpu", "name": "H100", "count": 1},        # GPU kind x GPUs (TP)
                  # or {"kind": "cpu", "name": "AMD EPYC", "count": 2}   (CPU model, cores)
      "model": {"name": "SmolLM2-135M", "arch_hash": "34fcb9936f2ba9a1", "dtype": "float32"},
                  # arch_hash: skybroker.models.ModelArch.arch_hash; without it the
                  # normalized name must match (skybroker.models.normalize_name)
      "engine": {"block_size": 16, "max_num_seqs": 64, "max_num_batched_tokens": 2048,
                 "num_kv_blocks": 4096},                               # optional: as measured
      "points": [                                                      # >= 4 measured steps
        {"num_prefill_tokens": 512, "num_decode_seqs": 0, "total_context_tokens": 512,
         "seconds": 0.081, "spread": 0.04},                            # spread: optional
        ...
      ],
      "fit": {"intercept": 0.01, "per_prefill_token": 1.4e-4, "per_decode_seq": 9e-4,
              "per_context_token": 2e-7, "per_attn_pair": 1e-9},       # optional; fitted on load
      "serving": {"request_overhead_s": 0.012, "step_overhead_s": 0.002,
                  "per_seq_overhead_s": 0.0004,
                  "busy_request_overhead_s": 0.03},                    # optional (see below)
      "step_noise": [0.9, 1.0, 1.3],                                   # optional (see below)
      "serving_steps": [[0, 4, 1040, 0, 0.0021, 0.0002], ...],         # optional (see below)
      "created": "2026-11-26T01:00:00Z", "source": "benchmarks/engine_profile.py"
    }

A step runs `num_prefill_tokens` prompt tokens and `num_decode_seqs` decode tokens over
`total_context_tokens` tokens of KV cache (all sequences of the batch, after the step). The
step-time model is the linear fit t = intercept + a*prefill + b*decode + c*context + e*pairs
(least squares of the relative error on the points, coefficients clipped at 0), where pairs
counts the prefill attention's (query, key) pairs: P^2/2 for a prompt chunk of P tokens from an
empty cache (a point may record `prefill_attn_pairs` itself). A fit without `per_attn_pair`
(written before that term) reads as 0.

`serving` holds what the HTTP server adds to the bare `LLMEngine.step()` (measured by the
profiler against a real `engine.serve` process): `request_overhead_s` once per request before
its first token (HTTP, JSON, tokenization, the hop to the engine thread and back, the first
SSE chunk) on an idle server, `busy_request_overhead_s` (optional) the same while the engine
is stepping, and `step_overhead_s` + `per_seq_overhead_s` x sequences: the engine loop's time
between two back-to-back steps (sending the step's tokens to the HTTP process, taking in new
requests). A profile without it predicts the bare engine.

`step_noise` lists quantiles (evenly spaced from 0 to 1) of one grid step's time over its
shape's median; the simulator draws each step's time factor from them. `serving_steps` lists
the steps the served engine ran under the profiler's streaming load, each
[prefill tokens, decode sequences, context tokens, prefill attention pairs, seconds, gap] from
the server's step log; the optional gap is the engine loop's time after the step until the
next one when the loop went straight on (null when it went idle: the step ended the work).
When there are enough, the simulator's factors come from them instead: each served step's
period (seconds + gap, or + the `serving` loop overhead when the gap is unknown) over the
model's time for its shape (the fit + the loop overhead), in sets per kind of step: steps
with prefill tokens, and decode-only steps per batch size (powers of two: 1, 2, 3-4, 5-8 ...).
That carries what serving costs the engine beyond the grid's steps (a neighbour process on a
small machine, caches the grid's back-to-back steps keep warm, a batch's sequences at
different positions, the loop's rare long pauses), not only the spread.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from skybroker.catalog.loader import BUNDLED_DIR as CATALOG_DIR
from skybroker.models import ModelArch, normalize_name
from skybroker.perf.roofline import Hardware, skybroker_home

SCHEMA = "skybroker-engine-profile/1"
POINT_KEYS = ("num_prefill_tokens", "num_decode_seqs", "total_context_tokens", "seconds")
FIT_KEYS = (
    "intercept",
    "per_prefill_token",
    "per_decode_seq",
    "per_context_token",
    "per_attn_pair",
)
SERVING_KEYS = ("request_overhead_s", "step_overhead_s", "per_seq_overhead_s")
MIN_SERVING_STEPS = 50  # fewer served steps: the grid's step_noise stands
MIN_KIND_STEPS = 20  # fewer served steps of one kind or batch bucket: a wider set's factor


class ProfileError(ValueError):
    """A profile file that does not follow the schema; the message names the field."""


@dataclass(frozen=True)
class EngineProfile:
    hardware: dict[str, Any]
    model: dict[str, Any]
    points: list[dict[str, float]]
    fit: dict[str, float] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    source: str = ""
    path: str = ""
    serving: dict[str, float] = field(default_factory=dict)
    step_noise: list[float] = field(default_factory=list)
    serving_steps: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {"schema": SCHEMA, "hardware": self.hardware, "model": self.model,
             "engine": self.engine, "points": self.points, "fit": self.fit,
             "created": self.created, "source": self.source}  # fmt: skip
        if self.serving:
            d["serving"] = self.serving
        if self.step_noise:
            d["step_noise"] = self.step_noise
        if self.serving_steps:
            d["serving_steps"] = self.serving_steps
        return d

    @property
    def hardware_tag(self) -> str:
        h = self.hardware
        return (
            f"gpu:{h['name']}x{h['count']}"
            if h["kind"] == "gpu"
            else f"cpu:{h['name']}:{h['count']}"
        )

    def model_mismatch(self, arch: ModelArch) -> str | None:
        """Why this profile is not of `arch`'s model (None when it is)."""
        m = self.model
        if m.get("arch_hash"):
            if m["arch_hash"] == arch.arch_hash:
                return None
            return (f"measured for model {m.get('name', '?')} (arch_hash {m['arch_hash']}, "
                    f"{m.get('dtype', '?')}), not {arch.name} (arch_hash {arch.arch_hash}, "
                    f"{arch.dtype})")  # fmt: skip
        if normalize_name(m["name"]) == normalize_name(arch.name):
            return None
        return f"measured for model {m['name']}, not {arch.name}"

    def hardware_mismatch(self, hw: Hardware) -> str | None:
        """Why this profile was not measured on `hw` (None when it was)."""
        h = self.hardware
        if (h["kind"], h["name"], int(h["count"])) == (hw.kind, hw.name, hw.count):
            return None
        return f"measured on {self.hardware_tag}, not on this replica's {hw.tag}"

    def mismatch(self, arch: ModelArch, hw: Hardware) -> str | None:
        """Why this profile cannot stand for (arch, hw), in words; None when it matches."""
        return self.hardware_mismatch(hw) or self.model_mismatch(arch)

    def matches(self, arch: ModelArch, hw: Hardware) -> bool:
        return self.mismatch(arch, hw) is None


def attn_pairs(point: dict[str, float]) -> float:
    """A point's prefill attention (query, key) pairs: recorded, or P^2/2 for a prompt chunk of
    P tokens prefilled from an empty cache (how the profiler measures prefill)."""
    if "prefill_attn_pairs" in point:
        return float(point["prefill_attn_pairs"])
    return point["num_prefill_tokens"] ** 2 / 2


def fit_points(points: list[dict[str, float]]) -> dict[str, float]:
    """Linear step-time model minimizing the relative error (small decode steps weigh as much
    as big prefills); negative coefficients are dropped and refitted. The attention term is
    quadratic in a prompt's length: a long prompt costs more than two halves of it."""
    x = np.array([[1.0, p["num_prefill_tokens"], p["num_decode_seqs"], p["total_context_tokens"],
                   attn_pairs(p)] for p in points])  # fmt: skip
    t = np.array([p["seconds"] for p in points])
    x, t = x / t[:, None], np.ones_like(t)
    active = np.ones(len(FIT_KEYS), dtype=bool)
    for _ in range(len(FIT_KEYS)):
        coef = np.zeros(len(FIT_KEYS))
        coef[active] = np.linalg.lstsq(x[:, active], t, rcond=None)[0]
        if (coef >= 0).all():
            break
        active &= coef > 0
        active[0] = True
    coef = np.maximum(coef, 0.0)
    return dict(zip(FIT_KEYS, (float(c) for c in coef), strict=True))


def validate(data: Any, where: str = "profile") -> EngineProfile:
    """An EngineProfile from parsed JSON, or ProfileError naming what is wrong."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: must be a JSON object")
    if data.get("schema") != SCHEMA:
        raise ProfileError(f"{where}: schema must be {SCHEMA!r}, got {data.get('schema')!r}")
    hw = data.get("hardware")
    if not isinstance(hw, dict) or hw.get("kind") not in ("gpu", "cpu") or not hw.get("name"):
        raise ProfileError(f"{where}: hardware needs kind (gpu|cpu), name and count")
    if not isinstance(hw.get("count"), int) or hw["count"] < 1:
        raise ProfileError(f"{where}: hardware.count must be an int >= 1, got {hw.get('count')!r}")
    model = data.get("model")
    if not isinstance(model, dict) or not (model.get("name") or model.get("arch_hash")):
        raise ProfileError(f"{where}: model needs name (and preferably arch_hash)")
    points = data.get("points")
    if not isinstance(points, list) or len(points) < 4:
        raise ProfileError(f"{where}: points must list at least 4 measured steps")
    for i, p in enumerate(points):
        for k in POINT_KEYS:
            v = p.get(k) if isinstance(p, dict) else None
            if not isinstance(v, int | float) or v < 0 or (k == "seconds" and v <= 0):
                raise ProfileError(
                    f"{where}: points[{i}].{k} must be a number >= 0 (seconds > 0), got {v!r}"
                )
    fit = data.get("fit") or fit_points(points)
    if isinstance(fit, dict) and set(fit) == set(FIT_KEYS[:4]):
        fit = {**fit, "per_attn_pair": 0.0}  # written before the attention term
    if (
        not isinstance(fit, dict)
        or set(fit) != set(FIT_KEYS)
        or any(not isinstance(v, int | float) or v < 0 for v in fit.values())
    ):
        raise ProfileError(
            f"{where}: fit must have {', '.join(FIT_KEYS[:4])} (numbers >= 0) and optionally "
            f"{FIT_KEYS[4]}"
        )
    serving = data.get("serving") or {}
    if serving and (not set(SERVING_KEYS) <= set(serving) or any(
        not isinstance(serving[k], int | float) or serving[k] < 0 for k in SERVING_KEYS
    )):  # fmt: skip
        raise ProfileError(f"{where}: serving must have {', '.join(SERVING_KEYS)} (numbers >= 0)")
    noise = data.get("step_noise") or []
    if noise and (not isinstance(noise, list) or len(noise) < 2
                  or any(not isinstance(q, int | float) or q <= 0 for q in noise)
                  or any(b < a for a, b in pairwise(noise))):  # fmt: skip
        raise ProfileError(f"{where}: step_noise must list >= 2 nondecreasing quantiles > 0 of a "
                           f"step's time over its shape's median, got {noise!r}")  # fmt: skip
    served = data.get("serving_steps") or []
    if served and (not isinstance(served, list) or any(
        not isinstance(r, list) or len(r) not in (5, 6) or r[4] <= 0
        or any(not isinstance(v, int | float) or v < 0 for v in r[:5])
        or (len(r) == 6 and r[5] is not None and (not isinstance(r[5], int | float) or r[5] < 0))
        for r in served
    )):  # fmt: skip
        raise ProfileError(f"{where}: serving_steps must list [prefill tokens, decode seqs, "
                           f"context tokens, attention pairs, seconds, gap seconds or null] "
                           f"(numbers >= 0, seconds > 0; the gap is optional)")  # fmt: skip
    return EngineProfile(hw, model, points, dict(fit), data.get("engine") or {},
                         data.get("created", ""), data.get("source", ""), where,
                         dict(serving), list(noise), [list(r) for r in served])  # fmt: skip


def load(path: str | Path) -> EngineProfile:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ProfileError(f"{path}: cannot read profile JSON ({e})") from None
    return validate(data, str(path))


def save(profile: EngineProfile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_dict(), indent=1) + "\n")


def batch_bucket(num_decode_seqs: float) -> int:
    """The served-step factor bucket of a decode batch: the next power of two (1, 2, 4, 8 ...)."""
    return 1 << max(math.ceil(math.log2(max(num_decode_seqs, 1))), 0)


@dataclass(frozen=True, slots=True)
class ServedFactors:
    """What serving multiplies the model's step time by, from a profile's served steps: a
    median per kind of step (with prefill tokens; decode-only per batch bucket) times a
    residual, the served step's factor over its kind's median, kept in the order the engine
    ran the steps. The simulator reads the residuals in runs of consecutive steps: a slow patch
    of the machine lasts several steps (on a quiet 16-vCPU host, runs of 2-7 steps at 3-7x),
    and a request's TTFT and TPOT average over neighbouring steps, so independent draws would
    smooth away the tails it sees."""

    prefill: float
    decode: float  # all decode-only steps
    by_batch: dict[int, float]  # decode-only steps per batch_bucket with enough of them
    residual: tuple[float, ...]

    def median(self, has_prefill: bool, num_decode_seqs: float) -> float:
        """The factor of a step of this kind: its own, or the nearest measured bucket's."""
        if has_prefill:
            return self.prefill
        if not self.by_batch:
            return self.decode
        b = batch_bucket(num_decode_seqs)
        return self.by_batch[min(self.by_batch, key=lambda k: (abs(math.log2(k / b)), k))]


_SERVED: dict[str, ServedFactors] = {}


def _period_ratios(model: ProfileModel, rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Each `serving_steps` row's period (seconds + the loop's gap after it, or + the model's
    loop overhead when the gap is unknown) over the model's time for its shape (fit + loop
    overhead)."""
    no_fit = replace(model.profile, fit=dict.fromkeys(model.profile.fit, 0.0))
    loop = ProfileModel(no_fit, model.cache_key + ":loop")
    return np.array([(r[4] + (r[5] if len(r) > 5 and r[5] is not None
                              else loop.step_time(0, r[1], 0)))
                     / max(model.step_time(*r[:4]), 1e-9) for r in rows])  # fmt: skip


def _served_factors(key: str, profile: EngineProfile) -> ServedFactors:
    """Each served step's period (seconds + the loop's gap after it, or + the `serving` loop
    overhead when the gap is unknown) over the model's time for its shape (fit + loop
    overhead); its kind's median, and the residuals. A kind or bucket with fewer than
    MIN_KIND_STEPS steps takes the wider set's median (all decodes; all steps). Serving slows
    the kinds differently: on a 2-vCPU VM decodes ran 1.3-1.5x the grid and prefills 1.6-2.2x in
    one run; on a quiet 16-vCPU host batch-1 decodes 0.7-0.85x the fit, batches of 9-16 1.2x."""
    if key not in _SERVED:
        rows = profile.serving_steps
        ratio = _period_ratios(ProfileModel(profile, key), rows)
        pre = np.array([r[0] > 0 for r in rows], dtype=bool)
        bucket = np.array([batch_bucket(r[1]) for r in rows])
        pooled = float(np.median(ratio))

        def med(sel: np.ndarray, wider: float) -> float:
            return float(np.median(ratio[sel])) if sel.sum() >= MIN_KIND_STEPS else wider

        decode = med(~pre, pooled)
        by_batch = {int(b): med(~pre & (bucket == b), decode) for b in np.unique(bucket[~pre])
                    if (~pre & (bucket == b)).sum() >= MIN_KIND_STEPS}  # fmt: skip
        f = ServedFactors(med(pre, pooled), decode, by_batch, ())
        kind = np.array([f.median(bool(r[0] > 0), r[1]) for r in rows])
        _SERVED[key] = replace(f, residual=tuple(round(float(x), 4) for x in ratio / kind))
    return _SERVED[key]


@dataclass(frozen=True, slots=True)
class ProfileModel:
    """Step-time model from a measured profile (same interface as RooflineModel)."""

    profile: EngineProfile
    cache_key: str

    @property
    def source(self) -> str:
        return f"profile:{self.profile.path}"

    @property
    def request_overhead_s(self) -> float:
        """Seconds each request spends in the server before and after the engine (TTFT adds it)."""
        return float(self.profile.serving.get("request_overhead_s", 0.0))

    @property
    def busy_request_overhead_s(self) -> float:
        """The same for a request arriving while the engine is stepping (the server's event loop
        then shares the GIL with the engine thread); the idle figure when not measured."""
        return float(self.profile.serving.get("busy_request_overhead_s", self.request_overhead_s))

    @property
    def step_noise(self) -> list[float]:
        """Quantiles of the grid's steps over their shape's median (empty: not measured): the
        simulator's step factors when the profile has too few served steps."""
        return self.profile.step_noise

    @property
    def served_factors(self) -> ServedFactors | None:
        """The simulator's step factors from the served steps (`serving_steps`), when there
        are at least MIN_SERVING_STEPS of them."""
        if len(self.profile.serving_steps) < MIN_SERVING_STEPS:
            return None
        return _served_factors(self.cache_key, self.profile)

    def speed_of(self, rows: Sequence[Sequence[float | None]]) -> np.ndarray:
        """How fast the engine ran these steps (`serving_steps` rows, e.g. from a step log)
        against the profile: each step's period over the model's time for its shape and its
        kind's served factor (1 without served steps). 1 is the speed the serving probe saw;
        the profile's own served steps have a median of 1 per kind."""
        ratio = _period_ratios(self, rows)
        f = self.served_factors
        if f is None or not len(ratio):
            return ratio
        return ratio / np.array([f.median(bool(r[0] > 0), r[1]) for r in rows])

    def _coefficients(self) -> tuple[float, float, float, float, float]:
        f, s = self.profile.fit, self.profile.serving
        return (f["intercept"] + s.get("step_overhead_s", 0.0), f["per_prefill_token"],
                f["per_decode_seq"] + s.get("per_seq_overhead_s", 0.0),
                f["per_context_token"], f["per_attn_pair"])  # fmt: skip

    def step_time(self, num_prefill_tokens: float, num_decode_seqs: float,
                  total_context_tokens: float, prefill_attn_pairs: float = 0.0) -> float:  # fmt: skip
        a, b, c, d, e = self._coefficients()
        return (a + b * num_prefill_tokens + c * num_decode_seqs + d * total_context_tokens
                + e * prefill_attn_pairs)  # fmt: skip

    def fast_step(self) -> Callable[[float, float, float, float], float]:
        a, b, c, d, e = self._coefficients()

        def step(p: float, n: float, ctx: float, pairs: float = 0.0) -> float:
            return a + b * p + c * n + d * ctx + e * pairs

        return step

    @classmethod
    def of(cls, profile: EngineProfile) -> ProfileModel:
        blob = json.dumps(profile.to_dict(), sort_keys=True).encode()
        return cls(profile, "profile:" + hashlib.sha256(blob).hexdigest()[:16])


_LOADED: dict[tuple[str, int, int], tuple[EngineProfile, ProfileModel]] = {}


def _stat_key(path: str | Path) -> tuple[str, int, int] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return str(path), st.st_mtime_ns, st.st_size


def _load_model(path: str | Path) -> tuple[EngineProfile, ProfileModel]:
    """The profile at `path` and its model, read again only when the file changed (a planner
    looks at every profile file for every GPU kind, and fitting one costs a least squares)."""
    key = _stat_key(path)
    if key is None:  # cannot be stat-ed: load() says why it cannot be read
        prof = load(path)
        return prof, ProfileModel.of(prof)
    if key not in _LOADED:
        prof = load(path)
        _LOADED[key] = prof, ProfileModel.of(prof)
    return _LOADED[key]


BUNDLED_DIR = CATALOG_DIR / "profiles"  # catalogs/profiles, also inside a wheel


def profile_files(paths: list[str] | None = None) -> list[tuple[Path, bool]]:
    """(file, named in the spec) in search order: spec, $SKYBROKER_HOME/profiles, bundled."""
    files = [(Path(p).expanduser(), True) for p in paths or []]
    for d in (skybroker_home() / "profiles", BUNDLED_DIR):
        if d.is_dir():
            files += [(f, False) for f in sorted(d.glob("*.json"))]
    return files


def find_profile(
    arch: ModelArch, hw: Hardware, paths: list[str] | None = None,
    notes: list[str] | None = None,
) -> ProfileModel | None:  # fmt: skip
    """The first profile (spec's paths, $SKYBROKER_HOME/profiles, catalogs/profiles) matching
    arch + hw. Skipped profiles worth knowing about (named in the spec, or of the same model
    and device kind) get a line in `notes` saying why they were not used."""
    for f, named in profile_files(paths):
        prof, model = _load_model(f)
        why = prof.mismatch(arch, hw)
        if why is None:
            return model
        near = prof.model_mismatch(arch) is None and prof.hardware["kind"] == hw.kind
        if notes is not None and (named or near):
            notes.append(f"profile {f} not used for {hw.tag}: {why}")
    return None
