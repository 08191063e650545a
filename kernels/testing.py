"""Random paged-attention cases and a naive dense oracle, shared by tests and benchmarks.

A case scatters each sequence's contiguous K/V into a paged cache through a shuffled block
table, so a kernel that ignores the block tables (or reads padded entries) gets it wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedCase:
    """Inputs of both attention ops plus the dense per-sequence K/V they were built from."""

    q: torch.Tensor  # [T, H, D]: q_lens[b] new tokens per sequence, concatenated
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with -1
    context_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    keys: list[torch.Tensor]  # per sequence [L, Hkv, D]
    values: list[torch.Tensor]
    scale: float


def make_paged_case(
    context_lens: list[int],
    q_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
) -> PagedCase:
    """Build a random case: sequence b has context_lens[b] cached tokens, the last q_lens[b] new."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # Fill unused slots with garbage so reading them shows up in the result.
    k_cache = torch.randn(shape, generator=gen) * 100
    v_cache = torch.randn(shape, generator=gen) * 100
    max_blocks = max(max(blocks_per_seq, default=1), 1)
    block_tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    keys, values, used = [], [], 0
    for b, n in enumerate(context_lens):
        ids = perm[used : used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        block_tables[b, : len(ids)] = ids.int()
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        slots = ids.repeat_interleave(block_size)[:n] * block_size + torch.arange(n) % block_size
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = k
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = v
        keys.append(k.to(dtype).to(device))
        values.append(v.to(dtype).to(device))
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedCase(
        q=q.to(dtype).to(device),
        k_cache=k_cache.to(dtype).to(device),
        v_cache=v_cache.to(dtype).to(device),
        block_tables=block_tables.to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        cu_seqlens_q=cu.to(device),
        keys=keys,
        values=values,
        scale=head_dim**-0.5,
    )


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Naive float64 attention of the last q.shape[0] positions of one sequence.

    q `[M, H, D]`, k/v `[L, Hkv, D]` (contiguous, no paging); query i sits at L - M + i.
    """
    num_q, num_heads, _ = q.shape
    length, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    kk = k.double().repeat_interleave(group, dim=1)  # [L, H, D]
    vv = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,lhd->hml", q.double(), kk) * scale
    q_pos = torch.arange(length - num_q, length)[:, None]
    k_pos = torch.arange(length)[None, :]
    visible = k_pos <= q_pos
    if sliding_window is not None:
        visible &= q_pos - k_pos < sliding_window
    scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
    return torch.einsum("hml,lhd->mhd", torch.softmax(scores, dim=-1), vv)


def dense_reference(case: PagedCase, sliding_window: int | None = None) -> torch.Tensor:
    """Dense float64 attention of every new token of the case: `[T, H, D]`."""
    cu = case.cu_seqlens_q.tolist()
    outs = [
        dense_attention(case.q[cu[b] : cu[b + 1]], k, v, case.scale, sliding_window)
        for b, (k, v) in enumerate(zip(case.keys, case.values, strict=True))
    ]
    return torch.cat(outs)
