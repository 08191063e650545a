"""The torch references (the engine's CPU path) against naive dense attention and HF Llama."""

from __future__ import annotations

import pytest
import torch

from kernels import ops, reference
from kernels.testing import dense_reference, make_paged_case

# (block_size, num_heads, num_kv_heads, head_dim)
SHAPES = [(4, 4, 4, 8), (8, 4, 2, 16), (16, 8, 2, 8), (8, 4, 1, 8)]
# context lengths: 1, exactly a block, a block plus one, mixed
CTX = [[1], [8], [9], [1, 8, 9, 23, 3]]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ctx", CTX)
@pytest.mark.parametrize("window", [None, 5])
def test_decode_matches_dense(shape: tuple, ctx: list[int], window: int | None) -> None:
    block_size, heads, kv_heads, dim = shape
    case = make_paged_case(ctx, [1] * len(ctx), heads, kv_heads, dim, block_size, seed=len(ctx))
    out = reference.paged_attention_decode(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale, window
    )
    torch.testing.assert_close(out.double(), dense_reference(case, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [None, 6])
def test_prefill_matches_dense(shape: tuple, window: int | None) -> None:
    block_size, heads, kv_heads, dim = shape
    # full prefill, chunked prefill over a cached prefix, single token, a block exactly, empty
    ctx, q_lens = [7, 20, 5, 8, 3], [7, 6, 1, 8, 0]
    case = make_paged_case(ctx, q_lens, heads, kv_heads, dim, block_size, seed=block_size)
    out = reference.paged_attention_prefill(
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.cu_seqlens_q,
        case.context_lens,
        case.scale,
        window,
    )
    torch.testing.assert_close(out.double(), dense_reference(case, window), atol=1e-5, rtol=1e-5)


def test_decode_fp16_and_empty_context() -> None:
    case = make_paged_case([5, 17], [1, 1], 4, 2, 8, 8, dtype=torch.float16, seed=3)
    out = ops.paged_attention_decode(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale
    )
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), dense_reference(case), atol=2e-3, rtol=2e-3)
    lens = torch.tensor([0, 17], dtype=torch.int32)
    out = reference.paged_attention_decode(
        case.q, case.k_cache, case.v_cache, case.block_tables, lens, case.scale
    )
    assert torch.all(out[0] == 0) and torch.isfinite(out).all()


def test_store_kvcache_skips_negative_slots() -> None:
    k_cache = torch.zeros(3, 4, 2, 8)
    v_cache = torch.zeros(3, 4, 2, 8)
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([5, -1, 11])
    ops.store_kvcache(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache[1, 1], key[0])
    torch.testing.assert_close(v_cache[2, 3], value[2])
    assert k_cache.count_nonzero() == 2 * key[0].numel()


def test_rms_norm_with_and_without_residual() -> None:
    x, res, weight = torch.randn(5, 32), torch.randn(5, 32), torch.randn(32)

    def naive(t: torch.Tensor) -> torch.Tensor:
        return weight * t / torch.sqrt((t * t).mean(-1, keepdim=True) + 1e-5)

    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), naive(x))
    normed, summed = ops.rms_norm(x, weight, 1e-5, residual=res)
    torch.testing.assert_close(summed, x + res)
    torch.testing.assert_close(normed, naive(x + res))


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rotary_matches_hf_llama(scaling: dict | None) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, heads, kv_heads, base = 16, 4, 2, 10000.0
    cfg = LlamaConfig(
        hidden_size=head_dim * heads,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rope_theta=base,
        rope_scaling=scaling,
        max_position_embeddings=512,
    )
    positions = torch.tensor([0, 1, 2, 63, 64, 65, 300, 511])
    q = torch.randn(len(positions), heads, head_dim)
    k = torch.randn(len(positions), kv_heads, head_dim)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, positions[None])
    # HF layout: [batch, heads, seq, dim]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    cache = ops.rope_cache(head_dim, 512, base, scaling)
    q_out, k_out = ops.apply_rotary(q, k, positions, cache)
    torch.testing.assert_close(q_out, q_hf[0].transpose(0, 1))
    torch.testing.assert_close(k_out, k_hf[0].transpose(0, 1))


def test_dispatch_env_and_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2, 4)
    monkeypatch.delenv("SKYBROKER_KERNELS", raising=False)
    assert ops.backend_for(x) == "torch"
    monkeypatch.setenv("SKYBROKER_KERNELS", "triton")
    assert ops.backend_for(x) == "triton"
    monkeypatch.setenv("SKYBROKER_KERNELS", "cuda")
    with pytest.raises(ValueError, match="SKYBROKER_KERNELS"):
        ops.backend_for(x)
    monkeypatch.setenv("SKYBROKER_KERNELS", "torch")
    cache = torch.zeros(2, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ops.paged_attention_decode(
            torch.zeros(1, 4, 8), cache, cache, torch.zeros(1, 1), torch.ones(1), 1.0
        )
    with pytest.raises(ValueError, match="sliding_window"):
        ops.paged_attention_decode(
            torch.zeros(1, 3, 8), cache, cache, torch.zeros(1, 1), torch.ones(1), 1.0, 0
        )
    with pytest.raises(ValueError, match="not supported"):
        ops.rope_cache(8, 16, 10000.0, {"rope_type": "yarn", "factor": 2.0})
