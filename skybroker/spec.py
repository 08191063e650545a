"""The deployment spec: one YAML file that says what to serve, to whom, how fast, within what.

    name: chat-8b
    infra: skypilot                  # or "local" (this machine only)
    model: meta-llama/Llama-3.1-8B-Instruct   # or {name:, path:, dtype:, architecture: {...}}
    workload:
      rate: 20                       # requests/s, all users together
      input_tokens: {mean: 600, p50: 400, p99: 3000}    # or an int, or {histogram: [[tokens, weight], ...]}
      output_tokens: {mean: 250, p99: 800}
      trace: null                    # or a JSONL file of {"input_tokens": .., "output_tokens": ..}
      users: {us-east: 0.6, eu-west: 0.4}   # where users are, share of the rate
    slo: {ttft_ms: 1000, tpot_ms: 50, percentile: 99, max_rtt_ms: 80}
    constraints: {clouds: [aws, gcp], spot: allowed, max_spot_share: 0.5, min_replicas: 2,
                  max_region_share: 1.0, max_cloud_share: 1.0, budget_per_hour: 40}
    engine: {max_model_len: 8192, tensor_parallel: auto, max_num_seqs: 256}

`load_spec(path_or_text)` validates it (pydantic) and raises `SpecError` whose message names
the field, the bad value and what is allowed; `spec_json_schema()` is the JSON schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

KNOWN_CLOUDS = (
    "aws", "gcp", "azure", "lambda", "runpod", "oci", "nebius", "fluidstack", "paperspace",
    "cudo", "vast", "ibm", "do", "scp", "kubernetes", "local",
)  # fmt: skip


SHARE_TOLERANCE = 0.01  # users' shares may sum to 1 +- this (0.33 + 0.33 + 0.33)


class SpecError(ValueError):
    """A spec a person must fix; `str()` is the message to show them (no traceback).
    `problems` lists (field, message) pairs where the fields at fault are known."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Architecture(_Strict):
    """A model's shape, for models the planner cannot read or look up."""

    num_layers: int = Field(gt=0, description="decoder layers")
    hidden_size: int = Field(gt=0, description="model width")
    num_heads: int = Field(gt=0, description="query heads")
    num_kv_heads: int | None = Field(
        default=None, gt=0, description="KV heads (GQA); null: num_heads"
    )
    head_dim: int | None = Field(default=None, gt=0, description="null: hidden_size / num_heads")
    intermediate_size: int = Field(gt=0, description="MLP width (gated: three matrices)")
    vocab_size: int = Field(gt=0, description="tokens in the vocabulary")
    tie_word_embeddings: bool = Field(default=False, description="LM head shares the embedding")
    max_position_embeddings: int = Field(default=8192, gt=0, description="longest context")


class ModelSpec(_Strict):
    """What to serve: a well-known name / hub id, a local HF dir or GGUF file, or numbers."""

    name: str | None = Field(default=None, description="hub id or well-known name; "
                             "`infra: local` resolves it to a copy on this machine")  # fmt: skip
    path: str | None = Field(default=None, description="a Hugging Face model dir or a .gguf file")
    dtype: Literal["bfloat16", "float16", "float32", "fp8", "int8", "int4"] | None = Field(
        default=None, description="weights' dtype for sizing; null: the model's own"
    )
    architecture: Architecture | None = Field(
        default=None, description="the shape in numbers, for a model the planner cannot read"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if not (self.name or self.path):
            raise ValueError("give a model name (e.g. meta-llama/Llama-3.1-8B-Instruct) or a path")
        return self

    @property
    def label(self) -> str:
        return self.name or Path(self.path or "model").name


class LengthDist(_Strict):
    """Token lengths: a mean with optional percentiles (fitted as a log-normal), or a histogram."""

    mean: float | None = Field(default=None, gt=0, description="mean tokens")
    p50: float | None = Field(default=None, gt=0, description="median tokens")
    p90: float | None = Field(default=None, gt=0, description="90th percentile")
    p99: float | None = Field(default=None, gt=0, description="99th percentile")
    max: int | None = Field(default=None, gt=0, description="longest (samples are capped)")
    histogram: list[tuple[Annotated[int, Field(gt=0)], Annotated[float, Field(ge=0)]]] | None = (
        Field(default=None, description="[[tokens, weight], ...] instead of mean/percentiles")
    )

    @model_validator(mode="after")
    def _has_shape(self) -> LengthDist:
        if self.histogram is None and self.mean is None and self.p50 is None:
            raise ValueError(
                "give mean (optionally p50/p90/p99/max) or histogram: [[tokens, weight], ...]"
            )
        if self.histogram is not None and not any(w > 0 for _, w in self.histogram):
            raise ValueError("histogram needs at least one positive weight")
        qs = [q for q in (self.p50, self.p90, self.p99, self.max) if q is not None]
        if qs != sorted(qs):
            raise ValueError("percentiles must not decrease: p50 <= p90 <= p99 <= max")
        return self


def _length(v: Any) -> Any:
    return {"mean": v} if isinstance(v, int | float) and not isinstance(v, bool) else v


def _hourly_schedule(v: Any) -> Any:
    """`[r0, ..., r23]` or `{hour: rate}` -> {hour: rate}, hours 0-23 and rates > 0."""
    if v is None:
        return v
    if isinstance(v, list):
        if len(v) != 24:
            raise ValueError(f"a list of 24 hourly rates (hours 0-23), not {len(v)}")
        v = dict(enumerate(v))
    if not isinstance(v, dict) or not v:
        raise ValueError("rates per hour of day: [r0, ..., r23] or {hour: rate}")
    out = {}
    for h, r in v.items():
        if not (isinstance(h, int) or str(h).isdigit()) or not 0 <= int(h) <= 23:
            raise ValueError(f"hour {h!r}: hours of day are 0-23")
        if isinstance(r, bool) or not isinstance(r, int | float) or r <= 0:
            raise ValueError(f"hour {h}: rate {r!r} must be a number > 0 (requests/s)")
        out[int(h)] = float(r)
    return out


class UserRegion(_Strict):
    """One user region: its share of the rate, optionally where it is."""

    share: float = Field(gt=0, le=1, description="this region's share of the rate")
    lat: float | None = Field(default=None, ge=-90, le=90, description="where they are")
    lon: float | None = Field(default=None, ge=-180, le=180, description="where they are")


class Workload(_Strict):
    """The traffic: request rate, request sizes, where the users are."""

    rate: float = Field(gt=0, description="requests per second, all user regions together")
    input_tokens: LengthDist = Field(
        default_factory=lambda: LengthDist(mean=512), description="prompt lengths (or an int)"
    )
    output_tokens: LengthDist = Field(
        default_factory=lambda: LengthDist(mean=256), description="output lengths (or an int)"
    )
    trace: str | None = Field(
        default=None, description="JSONL of {input_tokens, output_tokens}: replaces the lengths"
    )
    users: dict[str, UserRegion] = Field(
        default_factory=dict,
        description="area, cloud region (aws/us-east-1) or {share, lat, lon} -> share of the "
        "rate (summing to 1); a list means equal shares; none: users anywhere",
    )
    response_bytes_per_token: float = Field(
        default=200.0, ge=0, description="egress bytes per output token (streamed SSE chunks)"
    )
    schedule: dict[int, float] | None = Field(
        default=None, description="requests/s per hour of day (0-23, UTC), for a known curve"
    )

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, v: Any) -> Any:
        return _hourly_schedule(v)

    @field_validator("input_tokens", "output_tokens", mode="before")
    @classmethod
    def _length_shorthand(cls, v: Any) -> Any:
        return _length(v)

    @field_validator("users", mode="before")
    @classmethod
    def _shares(cls, v: Any) -> Any:
        if isinstance(v, list):  # [us-east, eu-west] -> equal shares
            return {str(name): {"share": 1.0 / len(v)} for name in v}
        if isinstance(v, dict):
            return {k: ({"share": s} if isinstance(s, int | float) else s) for k, s in v.items()}
        return v

    @field_validator("users", mode="after")
    @classmethod
    def _shares_sum_to_one(cls, v: dict[str, UserRegion]) -> dict[str, UserRegion]:
        total = sum(u.share for u in v.values())
        if v and abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"the shares must sum to 1 (each is a share of the rate); "
                             f"these sum to {total:g}")  # fmt: skip
        return v

    def user_shares(self) -> dict[str, float]:
        """Users' shares of the rate, normalised to sum to 1 (one anywhere-user if none)."""
        if not self.users:
            return {"any": 1.0}
        total = sum(u.share for u in self.users.values())
        return {k: u.share / total for k, u in self.users.items()}


class SLO(_Strict):
    """Latency targets, met at `percentile` by every replica at its planned load."""

    ttft_ms: float = Field(default=2000.0, gt=0, description="time to first token (server side)")
    tpot_ms: float = Field(default=100.0, gt=0, description="time per output token")
    percentile: float = Field(default=99.0, gt=0, lt=100, description="e.g. 99 for p99")
    max_rtt_ms: float | None = Field(default=None, gt=0, description="user <-> replica RTT")
    margin: Literal["auto"] | Annotated[float, Field(ge=0, le=2)] = Field(
        default="auto",
        description="plan so the SLO holds with every step (1 + margin) x slower than predicted; "
        "auto: from the perf model's measured error (0.17 profile, 0.25 roofline)",
    )


class Constraints(_Strict):
    """Where and how the deployment may run."""

    clouds: list[str] | None = Field(default=None, description="clouds to use; null: all")
    regions: list[str] | None = Field(default=None, description="regions to use; null: all")
    exclude_regions: list[str] = Field(default_factory=list, description="regions never used")
    gpus: list[str] | None = Field(default=None, description="GPU kinds to use; null: all")
    exclude_gpus: list[str] = Field(default_factory=list, description="GPU kinds never used")
    spot: Literal["never", "allowed", "prefer"] = Field(
        default="never", description="allowed: spot may serve up to max_spot_share (0.5)"
    )
    max_spot_share: float | None = Field(
        default=None, ge=0, le=1, description="share of the rate spot replicas may serve"
    )
    min_replicas: int = Field(default=1, ge=0, description="replicas at least, in all")
    max_region_share: float = Field(
        default=1.0, gt=0, le=1, description="share of the rate any one region may serve"
    )
    max_cloud_share: float = Field(
        default=1.0, gt=0, le=1, description="share of the rate any one cloud may serve"
    )
    budget_per_hour: float | None = Field(
        default=None, gt=0, description="$/h of the whole plan at most: instances and egress"
    )
    max_local_replicas: int | None = Field(
        default=None,
        gt=0,
        description="infra local: engine processes this machine runs at most (default: from "
        "its cores and memory)",
    )

    @field_validator("clouds")
    @classmethod
    def _known_clouds(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        bad = [c for c in v if c.lower() not in KNOWN_CLOUDS]
        if bad:
            raise ValueError(f"unknown cloud {bad[0]!r}; allowed: {', '.join(KNOWN_CLOUDS)}")
        return [c.lower() for c in v]

    def spot_share_limit(self) -> float:
        """Share of the rate spot replicas may serve: 0 for never; default 0.5 for allowed
        (on-demand keeps half, SpotHedge-style); default 1.0 for prefer."""
        if self.spot == "never":
            return 0.0
        if self.max_spot_share is not None:
            return self.max_spot_share
        return 0.5 if self.spot == "allowed" else 1.0


class EngineSpec(_Strict):
    """The bundled engine's settings on every replica."""

    max_model_len: int | None = Field(
        default=None, gt=0, description="longest request; null: the workload's longest"
    )
    tensor_parallel: Literal["auto"] | Annotated[int, Field(gt=0)] = Field(
        default="auto", description="GPUs per engine, a power of two; auto: the fewest that fit"
    )
    max_num_seqs: int = Field(default=256, gt=0, description="sequences in a batch at most")
    max_num_batched_tokens: int = Field(
        default=8192, gt=0, description="tokens in one engine step at most (chunked prefill)"
    )
    block_size: int = Field(default=16, gt=0, description="tokens per KV-cache block")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="share of GPU memory for weights and KV cache"
    )
    kv_cache_gib: float | None = Field(
        default=None, gt=0, description="KV cache size of CPU replicas (infra local)"
    )
    profiles: list[str] = Field(
        default_factory=list, description="measured engine profiles (JSON) to plan with"
    )

    @field_validator("tensor_parallel")
    @classmethod
    def _pow2(cls, v: Any) -> Any:
        if isinstance(v, int) and v & (v - 1):
            raise ValueError(f"tensor_parallel must be auto or a power of two, not {v}")
        return v


class Autoscale(_Strict):
    """Replicas follow the observed load (`skybroker.autoscale`)."""

    min_replicas: int = Field(default=1, ge=0, description="replicas at least")
    max_replicas: int = Field(default=10, gt=0, description="replicas at most")
    upscale_delay_s: float = Field(default=0.0, ge=0, description="overload this long: up")
    downscale_delay_s: float = Field(default=300.0, ge=0, description="spare this long: down")
    headroom: float = Field(default=0.2, ge=0, lt=1, description="share of capacity kept free")
    window_s: float = Field(default=30.0, gt=0, description="load is averaged over this long")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscale:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class SpotPolicy(_Strict):
    """How spot replicas are hedged: on-demand stand-ins while spot is scarce, spread."""

    fallback: Literal["on_demand", "none"] = Field(
        default="on_demand",
        description="on_demand: on-demand replicas stand in while spot is scarce",
    )
    spread: int = Field(
        default=1,
        ge=1,
        description="no region serves more than 1/N of the spot traffic (spot over N regions "
        "at least; none where fewer have spot)",
    )


class DeploymentSpec(_Strict):
    """One deployment: what to serve, to whom, how fast, within what."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="the deployment's name")
    infra: Literal["local", "skypilot"] = Field(
        default="local", description="local: this machine only, $0; skypilot: the clouds"
    )
    model: ModelSpec = Field(description="what to serve (a string: its name)")
    workload: Workload = Field(description="the traffic to serve")
    slo: SLO = Field(default_factory=SLO, description="latency targets")
    constraints: Constraints = Field(
        default_factory=Constraints, description="where and how it may run"
    )
    engine: EngineSpec = Field(default_factory=EngineSpec, description="the engine's settings")
    autoscale: Autoscale | None = Field(
        default=None, description="replicas follow the observed load; null: a fixed plan"
    )
    spot: SpotPolicy | None = Field(default=None, description="how spot replicas are hedged")

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _scaling_fits(self) -> DeploymentSpec:
        if self.spot is not None and self.constraints.spot == "never":
            raise ValueError(
                "spot: is given but constraints.spot is never; set constraints.spot to "
                "allowed or prefer, or drop spot:"
            )
        a = self.autoscale
        if a is not None and a.max_replicas < self.constraints.min_replicas:
            raise ValueError(
                f"autoscale.max_replicas {a.max_replicas} < constraints.min_replicas "
                f"{self.constraints.min_replicas}"
            )
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid deployment spec {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            lines.append(f"  {where}: required field is missing")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown field (check its spelling)")
        elif isinstance(e.get("input"), dict | list):  # a whole section: its message says it
            lines.append(f"  {where}: {msg}")
        else:
            lines.append(f"  {where}: {e.get('input')!r} is not allowed: {msg}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "") -> DeploymentSpec:
    if data is None:
        raise SpecError(f"deployment spec {source} is empty".replace("  ", " "))
    if not isinstance(data, dict):
        raise SpecError(f"deployment spec {source} must be a YAML mapping (name:, model:, ...), "
                        f"not a {type(data).__name__}")  # fmt: skip
    try:
        return DeploymentSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_errors(e, source)) from None


def load_spec(path_or_text: str | Path) -> DeploymentSpec:
    """A validated spec from a YAML file path or YAML text. Raises SpecError."""
    text, source = str(path_or_text), "(text)"
    if isinstance(path_or_text, Path) or ("\n" not in text and text.endswith((".yaml", ".yml"))):
        path = Path(path_or_text)
        if not path.is_file():
            raise SpecError(f"spec file {path} does not exist")
        text, source = path.read_text(), str(path)
    if not text.strip():
        raise SpecError(f"deployment spec {source} is empty")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"deployment spec {source} is not valid YAML{at}: "
                        f"{getattr(e, 'problem', e)}") from None  # fmt: skip
    return parse_spec(data, source)


def spec_json_schema() -> str:
    """The JSON schema of a deployment spec, for editors."""
    schema = DeploymentSpec.model_json_schema()
    schema["title"] = "skybroker deployment spec"
    return json.dumps(schema, indent=2)
