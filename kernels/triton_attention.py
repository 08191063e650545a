"""Triton paged attention over block tables: split-context decode (flash-decoding) and prefill.

Same signatures as `kernels.reference` (plus tuning keywords). K/V tiles are gathered token by
token through the block table, so any page size works and each tile is BLOCK_N tokens wide
whatever the block size. Query heads sharing a KV head are processed by one program, so each
KV tile is loaded once per group (GQA/MQA). Softmax runs in fp32 in the log2 domain.

Decode: grid (seqs, kv_heads, splits). Each program covers one partition of the context and
writes a partial output and its log-sum-exp; a second kernel merges the partitions. The number
of splits is chosen from shapes only (block-table width, not the context lengths), so there is
no host sync and the launch is CUDA-graph friendly.

Prefill: grid (query tiles + seqs, kv_heads). Tiles of all sequences are numbered in one range
(cumulative tile counts computed on device); each program finds its sequence by counting.

Under TRITON_INTERPRET=1 bf16 `tl.dot` is wrong, so there the dots run in fp32 (DOT_F32).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:  # noqa: SIM108 (a constexpr branch, kept explicit for Triton)
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _attend_range(
    acc,
    l_i,
    m_i,
    q,
    q_pos,
    k_cache,
    v_cache,
    table_ptr,
    kv_head_off,
    lo,
    hi,
    window,
    qk_scale,
    block_size,
    stride_kb,
    stride_kt,
    offs_d,
    d_mask,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_F32: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Online-softmax accumulation of rows q `[R, D]` (at positions q_pos) over keys [lo, hi)."""
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        block = tl.load(table_ptr + k_pos // block_size, mask=k_ok, other=0).to(tl.int64)
        off = block * stride_kb + (k_pos % block_size) * stride_kt + kv_head_off
        kv_mask = k_ok[:, None] & d_mask[None, :]
        k = tl.load(k_cache + off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_F32, IEEE) * qk_scale  # [R, BLOCK_N], log2 units
        visible = k_ok[None, :]
        if CAUSAL:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows that saw no key yet keep m = -inf: shift by 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache + off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _decode_kernel(
    q,
    k_cache,
    v_cache,
    out,
    o_part,
    lse_part,
    block_tables,
    context_lens,
    qk_scale,
    window,
    partition_size,
    num_splits,
    group,
    head_dim,
    block_size,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_bt,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SINGLE: tl.constexpr,
    DOT_F32: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens + seq)
    lo = split * partition_size
    hi = tl.minimum(lo + partition_size, ctx)
    if USE_WINDOW:
        lo = tl.maximum(lo, ctx - window)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    heads = kv_head * group + offs_g
    row_mask = (offs_g < group)[:, None] & d_mask[None, :]
    q_ptrs = q + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    qv = tl.load(q_ptrs, mask=row_mask, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    q_pos = tl.zeros([BLOCK_G], tl.int32) + ctx - 1
    acc, l_i, m_i = _attend_range(
        acc,
        l_i,
        m_i,
        qv,
        q_pos,
        k_cache,
        v_cache,
        block_tables + seq * stride_bt,
        kv_head * stride_kh,
        lo,
        hi,
        window,
        qk_scale,
        block_size,
        stride_kb,
        stride_kt,
        offs_d,
        d_mask,
        BLOCK_N,
        False,
        False,  # the window is applied through lo
        DOT_F32,
        IEEE,
    )
    l_div = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_div[:, None]
    if SINGLE:
        o_ptrs = out + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out.dtype.element_ty), mask=row_mask)
    else:
        # partials: o_part [B, H, S, D] and lse_part [B, H, S], contiguous fp32
        bh = seq * (tl.num_programs(1) * group) + heads
        part = bh * num_splits + split
        tl.store(o_part + part[:, None] * head_dim + offs_d[None, :], o, mask=row_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_div))
        tl.store(lse_part + part, lse, mask=offs_g < group)


@triton.jit
def _merge_kernel(
    out,
    o_part,
    lse_part,
    num_heads,
    num_splits,
    head_dim,
    stride_ob,
    stride_oh,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    lse = tl.load(lse_part + bh * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    mask = s_mask[:, None] & (offs_d < head_dim)[None, :]
    parts = tl.load(
        o_part + (bh * num_splits + offs_s)[:, None] * head_dim + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    den = tl.sum(w, axis=0)
    o = tl.sum(parts * w[:, None], axis=0) / tl.where(den == 0.0, 1.0, den)
    seq = bh // num_heads
    head = bh % num_heads
    tl.store(
        out + seq * stride_ob + head * stride_oh + offs_d,
        o.to(out.dtype.element_ty),
        mask=offs_d < head_dim,
    )


@triton.jit
def _prefill_kernel(
    q,
    k_cache,
    v_cache,
    out,
    block_tables,
    cu_seqlens_q,
    context_lens,
    cu_tiles,
    num_seqs,
    qk_scale,
    window,
    group,
    head_dim,
    block_size,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_bt,
    BLOCK_TOK: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_F32: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    # Which sequence owns this tile: count the sequences whose tiles end at or before it.
    seq = 0
    for b0 in range(0, num_seqs, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        ends = tl.load(cu_tiles + 1 + offs_b, mask=offs_b < num_seqs, other=2**30)
        seq += tl.sum((ends <= tile_id).to(tl.int32), axis=0)
    if seq < num_seqs:
        tile = tile_id - tl.load(cu_tiles + seq)
        q_start = tl.load(cu_seqlens_q + seq)
        q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
        ctx = tl.load(context_lens + seq)

        rows = tl.arange(0, BLOCK_TOK * BLOCK_G)
        tok = tile * BLOCK_TOK + rows // BLOCK_G
        g = rows % BLOCK_G
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < head_dim
        row_ok = (tok < q_len) & (g < group)
        io_mask = row_ok[:, None] & d_mask[None, :]
        heads = kv_head * group + g
        q_ptrs = q + (q_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh
        qv = tl.load(q_ptrs + offs_d[None, :], mask=io_mask, other=0.0)
        q_pos = ctx - q_len + tok

        first = ctx - q_len + tile * BLOCK_TOK
        hi = tl.minimum(first + BLOCK_TOK, ctx)
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(first - window + 1, 0)
        m_i = tl.full([BLOCK_TOK * BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_TOK * BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_TOK * BLOCK_G, BLOCK_D], tl.float32)
        acc, l_i, m_i = _attend_range(
            acc,
            l_i,
            m_i,
            qv,
            q_pos,
            k_cache,
            v_cache,
            block_tables + seq * stride_bt,
            kv_head * stride_kh,
            lo,
            hi,
            window,
            qk_scale,
            block_size,
            stride_kb,
            stride_kt,
            offs_d,
            d_mask,
            BLOCK_N,
            True,
            USE_WINDOW,
            DOT_F32,
            IEEE,
        )
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = out + (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh
        tl.store(o_ptrs + offs_d[None, :], o.to(out.dtype.element_ty), mask=io_mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_flags(dtype: torch.dtype) -> tuple[bool, bool]:
    """(DOT_F32, IEEE): fp32 dots in the interpreter for bf16; exact fp32 (no TF32) for fp32."""
    dot_f32 = dtype == torch.bfloat16 and _interpreting()
    return dot_f32, dtype == torch.float32 or dot_f32


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_cache_layout(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need equal strides and a contiguous head_dim")


def _choose_splits(num_seqs: int, num_kv_heads: int, max_len: int, device: torch.device) -> int:
    """Enough programs to fill the GPU twice over, partitions of at least 256 tokens, <= 64."""
    want = triton.cdiv(2 * _num_sms(device), max(num_seqs * num_kv_heads, 1))
    return max(1, min(want, triton.cdiv(max_len, 256), 64))


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Decode attention, q `[B, H, D]` -> `[B, H, D]` (see `kernels.reference`)."""
    _check_cache_layout(k_cache, v_cache)
    if q.stride(-1) != 1:
        q = q.contiguous()
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    max_len = block_tables.shape[1] * block_size
    splits = num_splits or _choose_splits(num_seqs, num_kv_heads, max_len, q.device)
    partition = triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n
    splits = triton.cdiv(max_len, partition) if max_len else 1
    block_d = max(16, triton.next_power_of_2(head_dim))
    single = splits == 1
    if single:
        o_part = lse_part = out  # unused
    else:
        o_part = q.new_empty((num_seqs, num_heads, splits, head_dim), dtype=torch.float32)
        lse_part = q.new_empty((num_seqs, num_heads, splits), dtype=torch.float32)
    dot_f32, ieee = _dot_flags(q.dtype)
    _decode_kernel[(num_seqs, num_kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        out,
        o_part,
        lse_part,
        block_tables,
        context_lens,
        scale * _LOG2E,
        sliding_window or 0,
        partition,
        splits,
        group,
        head_dim,
        block_size,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None,
        SINGLE=single,
        DOT_F32=dot_f32,
        IEEE=ieee,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not single:
        _merge_kernel[(num_seqs * num_heads,)](
            out,
            o_part,
            lse_part,
            num_heads,
            splits,
            head_dim,
            out.stride(0),
            out.stride(1),
            BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out


def paged_attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    block_rows: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Prefill attention, q `[T, H, D]` -> `[T, H, D]` (see `kernels.reference`).

    A program holds `block_rows` rows: block_rows / group query tokens times the group's heads.
    """
    _check_cache_layout(k_cache, v_cache)
    if q.stride(-1) != 1:
        q = q.contiguous()
    total, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    num_seqs = context_lens.shape[0]
    out = torch.empty_like(q)
    if total == 0 or num_seqs == 0:
        return out
    block_g = triton.next_power_of_2(group)
    block_tok = max(1, block_rows // block_g)
    # rows of a tl.dot need >= 16 on GPUs
    block_tok = max(block_tok, triton.cdiv(16, block_g))
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(torch.int32)
    cu_tiles = torch.zeros(num_seqs + 1, dtype=torch.int32, device=q.device)
    torch.cumsum((q_lens + block_tok - 1) // block_tok, 0, out=cu_tiles[1:])
    # every sequence wastes at most one partial tile
    grid = (triton.cdiv(total, block_tok) + num_seqs, num_kv_heads)
    dot_f32, ieee = _dot_flags(q.dtype)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        cu_seqlens_q,
        context_lens,
        cu_tiles,
        num_seqs,
        scale * _LOG2E,
        sliding_window or 0,
        group,
        head_dim,
        block_size,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        BLOCK_TOK=block_tok,
        BLOCK_G=block_g,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=block_n,
        BLOCK_B=min(128, triton.next_power_of_2(num_seqs)),
        USE_WINDOW=sliding_window is not None,
        DOT_F32=dot_f32,
        IEEE=ieee,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
