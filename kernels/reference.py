"""Plain-torch references of every kernel: the CPU path of the engine and the tests' oracle.

Same signatures as `kernels.ops` (see CONTRACTS.md). KV cache per layer: k_cache and v_cache,
each `[num_blocks, block_size, num_kv_heads, head_dim]`; slot = block_id * block_size + offset.
Attention math runs in fp32 whatever the storage dtype and the result is cast back.
"""

from __future__ import annotations

import math

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


def _gather_slots(block_tables: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor):
    """Slot index of each token position through the block tables (any leading shape)."""
    block_size = cache.shape[1]
    blocks = block_tables[..., positions // block_size].long()
    # Unused block-table entries may hold -1 or garbage: clamp, the caller masks them out.
    return (blocks * block_size + positions % block_size).clamp_(0, cache.shape[0] * block_size - 1)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Grouped attention. q `[..., Hkv, M, D]`, k/v `[..., Hkv, L, D]`, mask `[..., 1, M, L]`.

    Rows with no visible key give zeros (not NaN).
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)
    scores.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    return torch.matmul(probs, v.float())


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
    max_len = int(context_lens.max())
    pos = torch.arange(max_len, device=q.device)
    slots = _gather_slots(block_tables, pos, k_cache)  # [B, L]
    # [B, L, Hkv, D] -> [B, Hkv, L, D]
    k = k_cache.flatten(0, 1)[slots].transpose(1, 2)
    v = v_cache.flatten(0, 1)[slots].transpose(1, 2)
    ctx = context_lens.long()[:, None]
    mask = pos[None, :] < ctx
    if sliding_window is not None:
        mask &= pos[None, :] >= ctx - sliding_window
    qg = q.view(num_seqs, num_kv_heads, group, head_dim)
    out = _attend(qg, k, v, mask[:, None, None, :], scale)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


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
    cu = cu_seqlens_q.tolist()
    ctx_lens = context_lens.tolist()
    k_flat, v_flat = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    for b, ctx in enumerate(ctx_lens):
        start, end = cu[b], cu[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        pos = torch.arange(ctx, device=q.device)
        slots = _gather_slots(block_tables[b], pos, k_cache)
        k = k_flat[slots].transpose(0, 1)  # [Hkv, L, D]
        v = v_flat[slots].transpose(0, 1)
        q_pos = pos[ctx - q_len :, None]
        mask = pos[None, :] <= q_pos
        if sliding_window is not None:
            mask &= pos[None, :] > q_pos - sliding_window
        # [q_len, Hkv, G, D] -> [Hkv, G * q_len, D]: each KV head serves its group in one matmul
        qg = q[start:end].view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        qg = qg.reshape(num_kv_heads, group * q_len, head_dim)
        o = _attend(qg, k, v, mask.repeat(group, 1)[None], scale)  # [Hkv, G * q_len, D]
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
    cos, sin = cache[positions].float().unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
