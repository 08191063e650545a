"""Triton elementwise kernels of the hot path: KV-cache store, fused add + RMSNorm, rotary.

Same signatures as `kernels.reference`. One program per token; the math runs in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(
    key,
    value,
    k_cache,
    v_cache,
    slot_mapping,
    num_kv_heads,
    head_dim,
    block_size,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_cb,
    stride_ct,
    stride_ch,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    slot = tl.load(slot_mapping + n).to(tl.int64)
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h < num_kv_heads)[:, None] & (offs_d < head_dim)[None, :]
        dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_ct
        dst = dst + offs_h[:, None] * stride_ch + offs_d[None, :]
        k = tl.load(key + n * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(
            value + n * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask
        )
        tl.store(k_cache + dst, k.to(k_cache.dtype.element_ty), mask=mask)
        tl.store(v_cache + dst, v.to(v_cache.dtype.element_ty), mask=mask)


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value `[N, Hkv, D]` into the caches at `slot_mapping[N]`; slot -1 skips a token."""
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need equal strides and a contiguous head_dim")
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        num_kv_heads,
        head_dim,
        k_cache.shape[1],
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


@triton.jit
def _rms_norm_kernel(
    x,
    residual,
    weight,
    out,
    residual_out,
    hidden,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    xv = tl.load(x + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # the sum is rounded to the activations' dtype, as the unfused `x + residual` would be
        xv = xv + tl.load(residual + row * stride_r + offs, mask=mask, other=0.0)
        tl.store(residual_out + row * stride_ro + offs, xv, mask=mask)
    xf = xv.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * rstd).to(xv.dtype)
    w = tl.load(weight + offs, mask=mask, other=0.0)
    tl.store(out + row * stride_o + offs, (w * normed).to(out.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with `residual` returns (normed(x + residual), x + residual)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, hidden = x2.shape
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual is not None:
        res2 = residual.reshape(-1, hidden).contiguous()
        res_out = torch.empty_like(x2)
    else:
        res2 = res_out = x2  # unused
    if rows:
        _rms_norm_kernel[(rows,)](
            x2,
            res2,
            weight.contiguous(),
            out,
            res_out,
            hidden,
            eps,
            x2.stride(0),
            res2.stride(0),
            out.stride(0),
            res_out.stride(0),
            HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(hidden),
            num_warps=min(16, max(1, triton.next_power_of_2(hidden) // 256)),
        )
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)


@triton.jit
def _rotate_rows(
    src, dst, num_heads, stride_s, stride_d, half, cos, sin,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < num_heads)[:, None] & (offs_k < half)[None, :]
    base = offs_h[:, None] * stride_s + offs_k[None, :]
    x1 = tl.load(src + base, mask=mask, other=0.0)
    x2 = tl.load(src + base + half, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    o1 = x1f * cos[None, :] - x2f * sin[None, :]
    o2 = x2f * cos[None, :] + x1f * sin[None, :]
    out_base = offs_h[:, None] * stride_d + offs_k[None, :]
    tl.store(dst + out_base, o1.to(x1.dtype), mask=mask)
    tl.store(dst + out_base + half, o2.to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q,
    k,
    q_out,
    k_out,
    positions,
    cache,
    num_heads,
    num_kv_heads,
    half,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_c,
    BLOCK_H: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(positions + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cache + pos * stride_c + offs, mask=offs < half, other=0.0).to(tl.float32)
    sin = tl.load(cache + pos * stride_c + half + offs, mask=offs < half, other=0.0).to(tl.float32)
    _rotate_rows(
        q + t * stride_qt, q_out + t * stride_qot, num_heads, stride_qh, stride_qoh, half,
        cos, sin, BLOCK_H, BLOCK_HALF,
    )  # fmt: skip
    _rotate_rows(
        k + t * stride_kt, k_out + t * stride_kot, num_kv_heads, stride_kh, stride_koh, half,
        cos, sin, BLOCK_KH, BLOCK_HALF,
    )  # fmt: skip


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q `[T, H, D]` and k `[T, Hkv, D]` at `positions[T]` (rotate-half, as HF Llama)."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cache = cache if cache.stride(-1) == 1 else cache.contiguous()
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q,
            k,
            q_out,
            k_out,
            positions,
            cache,
            num_heads,
            num_kv_heads,
            half,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_out.stride(0),
            k_out.stride(1),
            cache.stride(0),
            BLOCK_H=triton.next_power_of_2(num_heads),
            BLOCK_KH=triton.next_power_of_2(num_kv_heads),
            BLOCK_HALF=triton.next_power_of_2(half),
        )
    return q_out, k_out
