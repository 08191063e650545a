"""Triton kernels against the torch references: compiled on CUDA, else under TRITON_INTERPRET=1.

Triton decides when `triton` itself is imported (its own `tl.sum`, `tl.max` ... are jit
functions) and when each kernel is defined whether it is interpreted. So without CUDA this
module's tests run in a child pytest process started with TRITON_INTERPRET=1 (the only test of
the parent process), which keeps the variable out of every other test. bf16 runs its dots in
fp32 in the interpreter (its bf16 `tl.dot` is wrong there); on CUDA it runs natively.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# find_spec, not importorskip: without CUDA the parent process only starts the child, which
# needs triton installed, not imported here.
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IN_CHILD = os.environ.get("TRITON_INTERPRET") == "1"
RUN_HERE = DEVICE == "cuda" or IN_CHILD
needs_kernels = pytest.mark.skipif(not RUN_HERE, reason="run in the TRITON_INTERPRET=1 child")

if RUN_HERE:
    from kernels import ops, reference, triton_attention, triton_ops
    from kernels.testing import dense_reference, make_paged_case


@pytest.mark.skipif(RUN_HERE, reason="kernels run in this process")
def test_triton_kernels_in_interpreter() -> None:
    """Run this module's kernel tests in a child process with TRITON_INTERPRET=1 set first."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SKYBROKER_KERNELS", None)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    cmd += ["-k", "not test_triton_kernels_in_interpreter"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert re.search(r"\b\d+ passed", proc.stdout), proc.stdout[-2000:]
    assert "skipped" not in proc.stdout, proc.stdout[-2000:]


# (block_size, num_heads, num_kv_heads, head_dim): MHA, GQA 2, GQA 4, MQA (group 4)
SHAPES = [(4, 2, 2, 16), (8, 4, 2, 16), (16, 8, 2, 8), (8, 4, 1, 32)]
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _mixed_lengths(block_size: int) -> list[int]:
    """1, exactly a block, a block plus one, and two blocks plus some, in one batch."""
    return [1, block_size, block_size + 1, 2 * block_size + 3]


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


# The interpreter is slow: a covering set of combinations rather than their full product.
# (shape index, dtype, sliding window, forced number of splits)
DECODE_CASES = [
    (0, torch.float32, None, None),
    (1, torch.float16, 5, 3),
    (2, torch.float32, None, 3),
    (3, torch.float16, None, None),
]
PREFILL_CASES = [
    (0, torch.float16, None),
    (1, torch.float32, 6),
    (3, torch.float16, None),
]


@needs_kernels
@pytest.mark.parametrize(("shape_id", "dtype", "window", "splits"), DECODE_CASES)
def test_decode_matches_reference(
    shape_id: int, dtype: torch.dtype, window: int | None, splits: int | None
) -> None:
    block_size, heads, kv_heads, dim = SHAPES[shape_id]
    ctx = _mixed_lengths(block_size)
    case = make_paged_case(ctx, [1] * len(ctx), heads, kv_heads, dim, block_size, dtype, DEVICE)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale)
    # block_n=16 with forced splits: several tiles per partition and several partitions
    out = triton_attention.paged_attention_decode(
        *args, window, num_splits=splits, block_n=16 if splits else 64
    )
    _close(out, reference.paged_attention_decode(*args, window), dtype)
    if dtype == torch.float32:
        dense = dense_reference(case, window)
        torch.testing.assert_close(out.double(), dense.to(out.device), atol=1e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize(("shape_id", "dtype", "window"), PREFILL_CASES)
def test_prefill_matches_reference(shape_id: int, dtype: torch.dtype, window: int | None) -> None:
    block_size, heads, kv_heads, dim = SHAPES[shape_id]
    # full prefill, chunked prefill over a cached prefix, single token, exactly a block, empty
    ctx = [block_size + 1, 2 * block_size + 5, 5, block_size, 3]
    q_lens = [block_size + 1, 6, 1, block_size, 0]
    case = make_paged_case(ctx, q_lens, heads, kv_heads, dim, block_size, dtype, DEVICE, seed=7)
    args = (
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.cu_seqlens_q,
        case.context_lens,
        case.scale,
        window,
    )
    # small tiles so sequences span several query tiles and key tiles
    out = triton_attention.paged_attention_prefill(*args, block_rows=16, block_n=16)
    _close(out, reference.paged_attention_prefill(*args), dtype)


@needs_kernels
def test_bf16_attention() -> None:
    """bf16 (dots in fp32 under the interpreter, native on CUDA)."""
    case = make_paged_case([9, 17], [9, 1], 4, 2, 16, 8, torch.bfloat16, DEVICE, seed=5)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables)
    out = triton_attention.paged_attention_prefill(
        *args, case.cu_seqlens_q, case.context_lens, case.scale, block_rows=16, block_n=16
    )
    ref = reference.paged_attention_prefill(*args, case.cu_seqlens_q, case.context_lens, case.scale)
    _close(out, ref, torch.bfloat16)
    q = case.q[case.cu_seqlens_q[1:] - 1]  # the last new token of each sequence
    out = triton_attention.paged_attention_decode(q, *args[1:], case.context_lens, case.scale)
    ref = reference.paged_attention_decode(q, *args[1:], case.context_lens, case.scale)
    _close(out, ref, torch.bfloat16)


@needs_kernels
def test_decode_with_wide_block_table_and_empty_context() -> None:
    """A block table wider than the contexts (padded with -1) and a zero-length row."""
    case = make_paged_case([3, 12], [1, 1], 4, 1, 16, 4, device=DEVICE, spare_blocks=0)
    pad = torch.full((2, 6), -1, dtype=torch.int32, device=DEVICE)
    tables = torch.cat([case.block_tables, pad], dim=1)
    lens = torch.tensor([0, 12], dtype=torch.int32, device=DEVICE)
    args = (case.q, case.k_cache, case.v_cache, tables, lens, case.scale)
    out = triton_attention.paged_attention_decode(*args, num_splits=3, block_n=16)
    assert torch.all(out[0] == 0)
    _close(out, reference.paged_attention_decode(*args), torch.float32)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kvcache(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(4, 8, 2, 16, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(4, 8, 2, 16, generator=gen).to(dtype).to(DEVICE)
    key = torch.randn(5, 2, 16, generator=gen).to(dtype).to(DEVICE)
    value = torch.randn(5, 2, 16, generator=gen).to(dtype).to(DEVICE)
    slots = torch.tensor([0, 31, -1, 9, 17], device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    triton_ops.store_kvcache(key, value, k_cache, v_cache, slots)
    reference.store_kvcache(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x, res = (torch.randn(6, 48, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    weight = torch.randn(48, generator=gen).to(dtype).to(DEVICE)
    _close(triton_ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), dtype)
    normed, summed = triton_ops.rms_norm(x, weight, 1e-6, residual=res)
    ref_normed, ref_summed = reference.rms_norm(x, weight, 1e-6, residual=res)
    _close(normed, ref_normed, dtype)
    assert torch.equal(summed, ref_summed)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_llama3(dtype: torch.dtype) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    cache = reference.rope_cache(24, 256, 500000.0, scaling).to(DEVICE)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(5, 6, 24, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(5, 2, 24, generator=gen).to(dtype).to(DEVICE)
    positions = torch.tensor([0, 1, 31, 100, 255], device=DEVICE)
    for out, ref in zip(
        triton_ops.apply_rotary(q, k, positions, cache),
        reference.apply_rotary(q, k, positions, cache),
        strict=True,
    ):
        _close(out, ref, dtype)


@needs_kernels
def test_ops_dispatch_forced_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """SKYBROKER_KERNELS=triton sends CPU tensors through the (interpreted) Triton kernels."""
    case = make_paged_case([5, 9], [1, 1], 4, 2, 16, 4, device=DEVICE, seed=11)
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, case.scale)
    calls = []
    real = triton_attention.paged_attention_decode
    monkeypatch.setattr(
        triton_attention, "paged_attention_decode", lambda *a: calls.append(1) or real(*a)
    )
    monkeypatch.setenv("SKYBROKER_KERNELS", "triton")
    out = ops.paged_attention_decode(*args)
    assert calls == [1]
    _close(out, reference.paged_attention_decode(*args), torch.float32)
