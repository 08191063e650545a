"""One dispatch for every kernel: Triton on CUDA tensors, the torch reference on CPU.

`SKYBROKER_KERNELS=triton|torch` forces a backend (read at each call). Triton on CPU tensors
runs in the interpreter, which needs `TRITON_INTERPRET=1` set before `kernels.triton_*` is
first imported. Triton is imported lazily, only when a Triton kernel is actually used.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from kernels import reference

__all__ = [
    "apply_rotary",
    "backend_for",
    "paged_attention_decode",
    "paged_attention_prefill",
    "rms_norm",
    "rope_cache",
    "store_kvcache",
]

_BACKENDS = ("auto", "triton", "torch")


def backend_for(t: torch.Tensor) -> str:
    """ "triton" or "torch" for a kernel call on tensor `t` (env override, else by device)."""
    choice = os.environ.get("SKYBROKER_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"SKYBROKER_KERNELS={choice!r} is not one of {', '.join(_BACKENDS)}")
    if choice == "auto":
        return "triton" if t.is_cuda else "torch"
    return choice


# Which Triton module holds each op; imported only when a CUDA (or forced) call needs it.
_TRITON_MODULES = {
    "store_kvcache": "triton_ops",
    "paged_attention_decode": "triton_attention",
    "paged_attention_prefill": "triton_attention",
    "rms_norm": "triton_ops",
    "apply_rotary": "triton_ops",
}


def _dispatch(name: str, on: torch.Tensor, *args: Any) -> Any:
    """Run op `name` with the backend chosen for tensor `on`: the torch reference or Triton."""
    if backend_for(on) == "torch":
        return getattr(reference, name)(*args)
    module = importlib.import_module(f"kernels.{_TRITON_MODULES[name]}")
    return getattr(module, name)(*args)


def _check_kv(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )


def _check_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    _check_kv(k_cache, v_cache)
    if q.dim() != 3 or q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(
            f"q must be [tokens, num_heads, head_dim={k_cache.shape[-1]}], got {tuple(q.shape)}"
        )
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(
            f"num_heads ({q.shape[1]}) must be a multiple of num_kv_heads ({k_cache.shape[2]})"
        )


def _check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value `[N, Hkv, D]` into the caches at `slot_mapping[N]` (-1 skips), in place."""
    _check_kv(k_cache, v_cache)
    if key.shape != value.shape or key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"key/value must be [N, {k_cache.shape[2]}, {k_cache.shape[3]}], "
            f"got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if slot_mapping.shape != key.shape[:1]:
        raise ValueError(f"slot_mapping must be [{key.shape[0]}], got {tuple(slot_mapping.shape)}")
    return _dispatch("store_kvcache", key, key, value, k_cache, v_cache, slot_mapping)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Decode attention: q `[B, H, D]` (one token per sequence) -> `[B, H, D]`."""
    _check_attention(q, k_cache, v_cache)
    _check_window(sliding_window)
    if block_tables.shape[0] != q.shape[0] or context_lens.shape != q.shape[:1]:
        raise ValueError(
            f"block_tables [{q.shape[0]}, max_blocks] and context_lens [{q.shape[0]}] expected, "
            f"got {tuple(block_tables.shape)} and {tuple(context_lens.shape)}"
        )
    args = (q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)
    return _dispatch("paged_attention_decode", q, *args)


def paged_attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Prefill attention of new tokens `[T, H, D]` over cached prefix + causal self -> `[T, H, D]`."""
    _check_attention(q, k_cache, v_cache)
    _check_window(sliding_window)
    num_seqs = context_lens.shape[0]
    if cu_seqlens_q.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"cu_seqlens_q [B+1], block_tables [B, max_blocks] and context_lens [B] must agree, "
            f"got {tuple(cu_seqlens_q.shape)}, {tuple(block_tables.shape)}, "
            f"{tuple(context_lens.shape)}"
        )
    args = (q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, sliding_window)
    return _dispatch("paged_attention_prefill", q, *args)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm; with `residual` returns (normed(x + residual), x + residual)."""
    if x.shape[-1] != weight.shape[-1] or (residual is not None and residual.shape != x.shape):
        raise ValueError(
            f"rms_norm: x {tuple(x.shape)}, weight {tuple(weight.shape)} and residual "
            f"{None if residual is None else tuple(residual.shape)} do not agree"
        )
    return _dispatch("rms_norm", x, x, weight, eps, residual)


def rope_cache(
    head_dim: int, max_position: int, base: float, scaling: dict | None = None
) -> torch.Tensor:
    """`[max_position, head_dim]` fp32 cos|sin table (computed once, on CPU; move it to device)."""
    return reference.rope_cache(head_dim, max_position, base, scaling)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q `[T, H, D]` and k `[T, Hkv, D]` at `positions[T]` (rotate-half, HF Llama)."""
    if q.shape[-1] != k.shape[-1] or q.shape[-1] != cache.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(
            f"apply_rotary: q {tuple(q.shape)}, k {tuple(k.shape)} and cache "
            f"{tuple(cache.shape)} must share T and head_dim"
        )
    return _dispatch("apply_rotary", q, q, k, positions, cache)
