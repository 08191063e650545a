"""`torch.ops.skybroker.paged_attention`: one layer's KV-cache write and paged attention as one
opaque op, so `torch.compile` traces the model around it and one graph serves every context.

The op's tensors are only the layer's q/k/v `[T, heads, D]`; everything that changes with the
batch's contexts (slot mapping, block tables, context lengths, the KV caches) comes from the
step context the model runner sets around each forward (`step_context`), as vLLM's forward
context does. T may include padding rows past `num_tokens`: their K/V are not written and
their output rows are zeros.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch

from kernels import ops


@dataclass
class StepContext:
    """What attention needs beyond q/k/v for one step. Decode tokens come first."""

    num_tokens: int  # real tokens (rows past it are padding)
    num_decode_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] int64
    decode_block_tables: torch.Tensor  # [Bd, max_blocks] int32
    decode_context_lens: torch.Tensor  # [Bd] int32
    prefill_block_tables: torch.Tensor  # [Bp, max_blocks] int32
    prefill_cu_seqlens_q: torch.Tensor  # [Bp + 1] int32
    prefill_context_lens: torch.Tensor  # [Bp] int32
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache)


_CONTEXT: StepContext | None = None


@contextlib.contextmanager
def step_context(ctx: StepContext) -> Iterator[None]:
    global _CONTEXT
    prev, _CONTEXT = _CONTEXT, ctx
    try:
        yield
    finally:
        _CONTEXT = prev


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Write this step's K/V of `layer` and attend; q `[T, H, D]` -> `[T, H, D]`."""
    ctx = _CONTEXT
    if ctx is None:
        raise RuntimeError("paged_attention runs only inside kernels.attention_op.step_context")
    k_cache, v_cache = ctx.kv_caches[layer]
    n, nd = ctx.num_tokens, ctx.num_decode_tokens
    if n:
        ops.store_kvcache(k[:n], v[:n], k_cache, v_cache, ctx.slot_mapping[:n])
    parts = []
    if nd:
        parts.append(
            ops.paged_attention_decode(
                q[:nd],
                k_cache,
                v_cache,
                ctx.decode_block_tables,
                ctx.decode_context_lens,
                scale,
                sliding_window,
            )
        )
    if n > nd:
        parts.append(
            ops.paged_attention_prefill(
                q[nd:n],
                k_cache,
                v_cache,
                ctx.prefill_block_tables,
                ctx.prefill_cu_seqlens_q,
                ctx.prefill_context_lens,
                scale,
                sliding_window,
            )
        )
    if n < q.shape[0]:
        parts.append(q.new_zeros((q.shape[0] - n, *q.shape[1:])))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.library.custom_op("skybroker::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    scale: float,
    sliding_window: Optional[int],  # noqa: UP045 (torch.library parses Optional)
) -> torch.Tensor:
    # The KV caches it writes are not arguments: the compiler never sees (or reorders) them.
    return attend(q, k, v, layer, scale, sliding_window)


@paged_attention.register_fake
def _(q, k, v, layer, scale, sliding_window):
    return torch.empty_like(q)
