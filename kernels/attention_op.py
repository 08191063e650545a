"""`torch.ops.skybroker.paged_attention`: one layer's KV-cache write and paged attention as one
opaque op, so `torch.compile` traces the model around it and one graph serves every context.

The op's tensors are only the layer's q/k/v `[T, heads, D]`; everything that changes with the
batch's contexts (slot mapping, block tables, context lengths, the KV caches) comes from the
step context the model runner sets around each forward (`step_context`), as vLLM's forward
context does. T may include padding rows past `num_tokens`: their K/V are not written and
their output rows are zeros.

The op's kernel is `attend` (Triton on CUDA, torch on CPU) unless `kernels.cpu_attention` has
been loaded: then CPU calls run its C++ kernel (one call per layer for the whole step) and
`step_context` hands that kernel the step's layout. The eager model calls `attend` directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels import cpu_attention, ops, reference


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
    plans: dict = field(default_factory=dict)  # per-step gather plans, built by the first layer
    next_layer: int = 0  # the layer a call with `NEXT_LAYER` attends (counted per forward)


# The layer argument of a call that attends the layer after the previous call's (layer 0 first
# in each forward): what the compiled model passes, so every decoder layer traces to the same
# graph and one compiled layer serves them all.
NEXT_LAYER = -1


_CONTEXT: StepContext | None = None


def _on_cpu(ctx: StepContext) -> bool:
    return ctx.slot_mapping.device.type == "cpu"


def _set_cpu_step(ctx: StepContext | None) -> None:
    """Hand the step's layout to the C++ CPU kernel (`kernels.cpu_attention`), once per step."""
    if ctx is None:
        torch.ops.skybroker_cpu.clear_step()
        return
    k_caches = [k for k, _ in ctx.kv_caches]
    v_caches = [v for _, v in ctx.kv_caches]
    torch.ops.skybroker_cpu.set_step(
        ctx.num_tokens,
        ctx.num_decode_tokens,
        ctx.slot_mapping,
        ctx.decode_block_tables,
        ctx.decode_context_lens,
        ctx.prefill_block_tables,
        ctx.prefill_cu_seqlens_q,
        ctx.prefill_context_lens,
        k_caches,
        v_caches,
    )


@contextlib.contextmanager
def step_context(ctx: StepContext) -> Iterator[None]:
    global _CONTEXT
    prev, _CONTEXT = _CONTEXT, ctx
    ctx.next_layer = 0
    cpu = cpu_attention.is_loaded() and _on_cpu(ctx)
    if cpu:
        _set_cpu_step(ctx)
    try:
        yield
    finally:
        _CONTEXT = prev
        if cpu:
            _set_cpu_step(prev if prev is not None and _on_cpu(prev) else None)


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
    if layer < 0:
        layer, ctx.next_layer = ctx.next_layer, (ctx.next_layer + 1) % len(ctx.kv_caches)
    k_cache, v_cache = ctx.kv_caches[layer]
    n, nd = ctx.num_tokens, ctx.num_decode_tokens
    backend = ctx.plans.get("backend")
    if backend is None:
        backend = ctx.plans["backend"] = ops.backend_for(q)
    if backend == "torch":
        return _attend_torch(ctx, q, k, v, k_cache, v_cache, scale, sliding_window)
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
            _prefill(ops.paged_attention_prefill, ctx, q, k_cache, v_cache, scale, sliding_window)
        )
    if n < q.shape[0]:
        parts.append(q.new_zeros((q.shape[0] - n, *q.shape[1:])))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _prefill(kernel, ctx: StepContext, q, k_cache, v_cache, scale, sliding_window):
    """The step's prefill rows (`q[num_decode_tokens:num_tokens]`) through `kernel` (the ops
    or the reference `paged_attention_prefill`) with the step's prefill layout."""
    return kernel(
        q[ctx.num_decode_tokens : ctx.num_tokens],
        k_cache,
        v_cache,
        ctx.prefill_block_tables,
        ctx.prefill_cu_seqlens_q,
        ctx.prefill_context_lens,
        scale,
        sliding_window,
    )


def _attend_torch(ctx, q, k, v, k_cache, v_cache, scale, sliding_window) -> torch.Tensor:
    """The torch path with the step's gather plan built once for all layers (fewest ops)."""
    n, nd, total = ctx.num_tokens, ctx.num_decode_tokens, q.shape[0]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if n:
        if n < total:
            k, v = k[:n], v[:n]
        if k.dtype != k_cache.dtype:
            k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        slots = ctx.slot_mapping
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)
    parts = []
    if nd:
        key = ("decode", sliding_window)
        plan = ctx.plans.get(key)
        if plan is None:
            plan = ctx.plans[key] = reference._decode_plan(
                ctx.decode_block_tables, ctx.decode_context_lens, k_cache, sliding_window
            )
        index, bias = plan
        qg = (q[:nd] if nd < total else q).view(nd, num_kv_heads, -1, head_dim)
        # each KV head's query group is SDPA's query length; fp32 math as the reference
        o = F.scaled_dot_product_attention(
            qg.float(),
            reference._gather(k_cache, index),
            reference._gather(v_cache, index),
            attn_mask=bias,
            scale=scale,
        )
        parts.append(o.view(nd, q.shape[1], head_dim).to(q.dtype))
    if n > nd:
        parts.append(
            _prefill(
                reference.paged_attention_prefill, ctx, q, k_cache, v_cache, scale, sliding_window
            )
        )
    if not parts:
        return q.new_zeros(q.shape)
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return F.pad(out, (0, 0, 0, 0, 0, total - n)) if n < total else out


# A plain Library op (not torch.library.custom_op, whose Python wrapper costs ~10 us a call):
# its kernel is `attend` for every device, its fake returns q's shape. The KV caches it writes
# are not arguments, so the compiler never sees (or reorders) them.
_LIB = torch.library.Library("skybroker", "DEF")
_LIB.define(
    "paged_attention(Tensor q, Tensor k, Tensor v, int layer, float scale, int? sliding_window)"
    " -> Tensor"
)
_LIB.impl("paged_attention", attend, "CompositeExplicitAutograd")


@torch.library.register_fake("skybroker::paged_attention", lib=_LIB)
def _fake(q, k, v, layer, scale, sliding_window):
    return torch.empty_like(q)
