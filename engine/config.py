"""Engine arguments (what a person sets) and the model's architecture numbers (what it reads)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
)
_DTYPES = {  # name -> torch dtype attribute (torch is imported only where a model runs)
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


@dataclass
class EngineArgs:
    """Engine settings (vLLM's names). `model` is an HF-format directory or a .gguf file."""

    model: str
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    num_kv_blocks: int | None = None  # overrides kv_cache_gib / gpu_memory_utilization (tests)
    served_model_name: str | None = None
    step_log: str | None = None  # append one JSON line per step here (engine.metrics.StepLog)
    # torch.compile the model step. None: compile on CUDA, run eager on CPU (there a tiny
    # model's step gains less than the compile costs at start; pass False to compile anyway).
    enforce_eager: bool | None = None
    compile_cache_dir: str | None = None  # default: $SKYBROKER_COMPILE_CACHE or ~/.cache/...
    # inductor's C++ wrapper (the graph's launch code in C++, no Python per kernel). None: on
    # CPU, where that code is most of a step's host time; off on CUDA until measured there.
    compile_cpp_wrapper: bool | None = None
    cuda_graphs: bool = False  # replay decode steps as CUDA graphs (needs the compiled step)

    def __post_init__(self) -> None:
        if not Path(self.model).exists():
            raise ValueError(
                f"model must be an HF model directory or a .gguf file; {self.model!r} does not exist"
            )
        checks = {
            "block_size": self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
            "max_num_seqs": self.max_num_seqs >= 1,
            "max_num_batched_tokens": self.max_num_batched_tokens >= 1,
            "kv_cache_gib": self.kv_cache_gib > 0,
            "gpu_memory_utilization": 0 < self.gpu_memory_utilization <= 1,
            "tensor_parallel_size": self.tensor_parallel_size >= 1,
            "device": self.device in ("auto", "cpu", "cuda"),
            "dtype": self.dtype == "auto" or self.dtype in _DTYPES,
            "max_model_len": self.max_model_len is None or self.max_model_len >= 1,
            "num_kv_blocks": self.num_kv_blocks is None or self.num_kv_blocks >= 1,
        }
        allowed = {
            "block_size": "a power of two from 1 to 128",
            "device": "'auto', 'cpu' or 'cuda'",
            "dtype": f"'auto' or one of {sorted(_DTYPES)}",
            "gpu_memory_utilization": "in (0, 1]",
        }
        for name, ok in checks.items():
            if not ok:
                rule = allowed.get(name, "a positive number")
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    def resolved_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device must be 'cpu' or 'auto' here: CUDA is not available")
        return torch.device(self.device)

    def compiles(self, device: torch.device) -> bool:
        """Whether the model step runs under torch.compile on `device`."""
        if self.enforce_eager is None:
            return device.type == "cuda"
        return not self.enforce_eager

    def cpp_wrapper(self, device: torch.device) -> bool:
        """Whether the compiled step uses inductor's C++ wrapper on `device`."""
        if self.compile_cpp_wrapper is None:
            return device.type == "cpu"
        return self.compile_cpp_wrapper

    def resolved_compile_cache_dir(self) -> str:
        import os

        default = Path.home() / ".cache" / "skybroker" / "torch_compile"
        return self.compile_cache_dir or os.environ.get("SKYBROKER_COMPILE_CACHE") or str(default)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        import torch

        if self.dtype != "auto":
            return getattr(torch, _DTYPES[self.dtype])
        # fp32 on CPU (bf16 matmuls are far slower there); bf16 on CUDA.
        return torch.float32 if device.type == "cpu" else torch.bfloat16


@dataclass
class ModelConfig:
    """Architecture numbers of a Llama-family decoder (HF config.json names)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    layer_sliding_windows: list[int | None] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hidden_act: str = "silu"

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture must be one of {SUPPORTED_ARCHITECTURES}, got {arch!r}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {cfg.get('hidden_act')!r}")
        heads = cfg["num_attention_heads"]
        layers = cfg["num_hidden_layers"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        is_qwen = arch == "Qwen2ForCausalLM"
        attention_bias = bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window")
        if is_qwen and not cfg.get("use_sliding_window", False):
            window = None
        layer_types = cfg.get("layer_types")
        if layer_types and window:
            windows = [window if t == "sliding_attention" else None for t in layer_types]
        elif is_qwen and window:
            first = cfg.get("max_window_layers", layers)
            windows = [window if i >= first else None for i in range(layers)]
        else:
            windows = [window or None] * layers
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        scaling = cfg.get("rope_scaling")
        theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")  # newer transformers
        if theta is None and isinstance(rope_params, dict):
            theta = rope_params.get("rope_theta")
            if rope_params.get("rope_type", "default") != "default":
                scaling = rope_params
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta or 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen or attention_bias,
            o_bias=attention_bias and not is_qwen,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            layer_sliding_windows=windows,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf_dict(json.loads((Path(path) / "config.json").read_text()))

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h
