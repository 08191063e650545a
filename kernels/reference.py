"""Plain-torch references of every kernel: the CPU path of the engine and the tests' oracle.

Same signatures as `kernels.ops` (see CONTRACTS.md). KV cache per layer: k_cache and v_cache,
each `[num_blocks, block_size, num_kv_heads, head_dim]`; slot = block_id * block_size + offset.
Attention math runs in fp32 whatever the storage dtype and the result is cast back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "apply_rotary",
    "paged_attention_decode",
    "paged_attention_prefill",
    "rms_norm",
    "rope_cache",
    "store_kvcache",
]


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value `[N, Hkv, D]` into the caches at `slot_mapping[N]`; slot -1 skips a token."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep].to(v_cache.dtype)


# A step's gather indices and masks are the same for every layer: build them once per step.
_PLANS: dict[str, tuple[tuple, Any]] = {}


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a == b


def _memo(name: str, key: tuple, build: Callable[[], Any]) -> Any:
    """`build()`, reused while `key` holds the same tensors (same objects, unmodified)."""
    key = key + tuple(k._version for k in key if isinstance(k, torch.Tensor))
    hit = _PLANS.get(name)
    if hit is not None and len(hit[0]) == len(key) and all(map(_same, hit[0], key)):
        return hit[1]
    value = build()
    _PLANS[name] = (key, value)
    return value


def _gather_index(
    block_tables: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor
) -> torch.Tensor:
    """Rows of `cache` viewed as `[num_slots * Hkv, D]` for K/V laid out `[..., Hkv, L, D]`.

    Gathering with it gives K/V head-major, ready for the attention matmuls (no transpose copy).
    Unused block-table entries may hold -1 or garbage: clamped here, the caller masks them out.
    """
    num_blocks, block_size, num_kv_heads, _ = cache.shape
    blocks = block_tables[..., positions // block_size].long()
    slots = (blocks * block_size + positions % block_size).clamp_(0, num_blocks * block_size - 1)
    heads = torch.arange(num_kv_heads, device=slots.device)[:, None]
    return slots.unsqueeze(-2) * num_kv_heads + heads


def _gather(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """fp32 K or V `[*index.shape, D]` gathered from `cache` by a `_gather_index`."""
    rows = cache.view(-1, cache.shape[-1]).index_select(0, index.reshape(-1))
    return rows.view(*index.shape, -1).float()


def _mask_bias(visible: torch.Tensor) -> torch.Tensor:
    """Additive attention mask: 0 where visible, -inf elsewhere."""
    bias = torch.zeros(visible.shape, device=visible.device)
    return bias.masked_fill_(~visible, float("-inf"))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float):
    """Grouped attention. q `[..., Hkv, M, D]`, k/v `[..., Hkv, L, D]` fp32, `bias` additive
    mask broadcastable to `[..., Hkv, M, L]`. Rows with no visible key give zeros (not NaN)."""
    scores = torch.matmul(q.float(), k.transpose(-1, -2)).mul_(scale).add_(bias)
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    return torch.matmul(probs, v)


def _decode_plan(
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cache: torch.Tensor,
    sliding_window: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index `[B, Hkv, L]` and mask bias `[B, 1, 1, L]` of a decode batch."""
    max_len = int(context_lens.max())
    pos = torch.arange(max_len, device=block_tables.device)
    index = _gather_index(block_tables, pos, cache)
    ctx = context_lens.long()[:, None]
    visible = pos[None, :] < ctx
    if sliding_window is not None:
        visible &= pos[None, :] >= ctx - sliding_window
    return index, _mask_bias(visible)[:, None, None, :]


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence over its whole cached context. q `[B, H, D]` -> `[B, H, D]`.

    `context_lens[b]` counts the cached tokens including the current one; the query sits at
    position context_lens[b] - 1 and sees positions p with qpos - p < sliding_window.
    Vectorised over the batch: contexts are gathered padded to the longest one.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_seqs == 0:
        return q.new_empty(q.shape)
    key = (block_tables, context_lens, k_cache.shape, sliding_window)
    index, bias = _memo(
        "decode", key, lambda: _decode_plan(block_tables, context_lens, k_cache, sliding_window)
    )
    qg = q.view(num_seqs, num_kv_heads, group, head_dim)
    out = _attend(qg, _gather(k_cache, index), _gather(v_cache, index), bias, scale)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def _prefill_plan(
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    cache: torch.Tensor,
    sliding_window: int | None,
    group: int,
) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Per sequence with new tokens: (start, end, gather index `[Hkv, L]`, bias `[G * Q, L]`)."""
    cu = cu_seqlens_q.tolist()
    plan = []
    for b, ctx in enumerate(context_lens.tolist()):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        pos = torch.arange(ctx, device=block_tables.device)
        q_pos = pos[ctx - (end - start) :, None]
        visible = pos[None, :] <= q_pos
        if sliding_window is not None:
            visible &= pos[None, :] > q_pos - sliding_window
        bias = _mask_bias(visible).repeat(group, 1)  # rows ordered (group, token) as q below
        plan.append((start, end, _gather_index(block_tables[b], pos, cache), bias))
    return plan


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
    """New tokens of B sequences (concatenated in q `[T, H, D]`) over cached prefix + themselves.

    Their K/V are already in the cache. New token i of sequence b sits at position
    context_lens[b] - q_len_b + i and attends causally to cached positions <= its own.
    One loop step per sequence; the work inside is batched over its tokens and heads.
    """
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    key = (block_tables, cu_seqlens_q, context_lens, k_cache.shape, sliding_window, group)
    plan = _memo("prefill", key, lambda: _prefill_plan(block_tables, cu_seqlens_q, context_lens,
                                                       k_cache, sliding_window, group))  # fmt: skip
    for start, end, index, bias in plan:
        q_len = end - start
        # [q_len, Hkv, G, D] -> [Hkv, G * q_len, D]: each KV head serves its group in one matmul
        qg = q[start:end].view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        qg = qg.reshape(num_kv_heads, group * q_len, head_dim)
        o = _attend(qg, _gather(k_cache, index), _gather(v_cache, index), bias, scale)
        o = o.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3)
        out[start:end] = o.reshape(q_len, num_heads, head_dim).to(q.dtype)
    return out


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm as HF Llama (normalise in fp32, cast back, then scale by weight).

    With `residual` it first adds it (in x's dtype) and returns (normed(x + residual), x + residual).
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return out if residual is None else (out, x)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling (as HF's `_compute_llama3_parameters`)."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cache(
    head_dim: int, max_position: int, base: float, scaling: dict | None = None
) -> torch.Tensor:
    """`[max_position, head_dim]` fp32: first half cos, second half sin of position * inv_freq.

    `scaling` is HF's `rope_scaling` dict: None/"default", "linear" and "llama3" are supported.
    """
    if head_dim % 2:
        raise ValueError(f"rope head_dim must be even, got {head_dim}")
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponent)
    positions = torch.arange(max_position, dtype=torch.float32)
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "linear":
        positions = positions / float(scaling["factor"])
    elif kind not in (None, "default"):
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported; use default, linear or llama3"
        )
    freqs = torch.outer(positions, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox / rotate-half rotation of x `[T, heads, D]` by cos/sin `[T, 1, D/2]`, in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q `[T, H, D]` and k `[T, Hkv, D]` at `positions[T]` (rotate-half, as HF Llama)."""
    cos, sin = _memo(
        "rope", (positions, cache), lambda: cache[positions].float().unsqueeze(1).chunk(2, dim=-1)
    )
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
