"""The C++ CPU kernel of `skybroker::paged_attention` (kernels/cpu_attention.cpp) against the
op's torch path, on a step that mixes decode and chunked-prefill tokens plus padding rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.compiled_step import load_cpu_attention
from kernels import attention_op, cpu_attention
from kernels.attention_op import StepContext, step_context
from kernels.testing import make_paged_case

pytestmark = pytest.mark.slow  # the first test of a session builds the library (~10-30 s)

CTX = [5, 17, 33, 20, 7]
Q_LENS = [1, 1, 1, 4, 7]  # three decodes, then two prefill chunks
ND = 3


@pytest.fixture(scope="module", autouse=True)
def library(tmp_path_factory: pytest.TempPathFactory) -> None:
    cpu_attention.load(tmp_path_factory.mktemp("cpu-attention"))


def _step(shape: tuple[int, int, int, int], dtype: torch.dtype, pad: int):
    heads, kv_heads, head_dim, block_size = shape
    case = make_paged_case(CTX, Q_LENS, heads, kv_heads, head_dim, block_size, dtype, seed=3)
    n = sum(Q_LENS)
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(n + pad, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(n + pad, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.cat([case.q, torch.randn(pad, heads, head_dim, generator=gen).to(dtype)])
    slots = []
    for b, (ctx, m) in enumerate(zip(CTX, Q_LENS, strict=True)):
        for p in range(ctx - m, ctx):
            slots.append(int(case.block_tables[b, p // block_size]) * block_size + p % block_size)
    caches = (case.k_cache, case.v_cache)
    tables, lens = case.block_tables, case.context_lens

    def ctx_for(kv: tuple[torch.Tensor, torch.Tensor]) -> StepContext:
        return StepContext(
            num_tokens=n,
            num_decode_tokens=ND,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            decode_block_tables=tables[:ND],
            decode_context_lens=lens[:ND],
            prefill_block_tables=tables[ND:],
            prefill_cu_seqlens_q=torch.tensor([0, 4, 11], dtype=torch.int32),
            prefill_context_lens=lens[ND:],
            kv_caches=[kv],
        )

    return q, k, v, case.scale, caches, ctx_for


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(
    ("shape", "dtype", "tol"),
    [
        ((4, 2, 16, 16), torch.float32, 1e-5),  # fp32 shapes with compiled-in sizes
        ((8, 2, 32, 4), torch.float32, 1e-5),
        ((8, 2, 32, 16), torch.float32, 1e-5),  # blocks of 16: runs of eight scored at once
        ((2, 2, 64, 16), torch.float32, 1e-5),
        ((6, 2, 24, 4), torch.float32, 1e-5),  # head size and group taken at run time
        ((6, 2, 32, 4), torch.bfloat16, 2e-2),  # other dtypes: run-time loops
    ],
)
def test_cpu_kernel_equals_torch_path(shape, dtype, tol, window) -> None:
    q, k, v, scale, (kc, vc), ctx_for = _step(shape, dtype, pad=2)
    torch_kv = (kc.clone(), vc.clone())
    cpp_kv = (kc.clone(), vc.clone())
    with step_context(ctx_for(torch_kv)):
        want = attention_op.attend(q, k, v, 0, scale, window)
    with step_context(ctx_for(cpp_kv)):
        got = torch.ops.skybroker.paged_attention(q, k, v, 0, scale, window)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert not got[-2:].any()  # padding rows
    assert torch.equal(cpp_kv[0], torch_kv[0]) and torch.equal(cpp_kv[1], torch_kv[1])


def test_cpu_kernel_skips_negative_slots_and_needs_a_step() -> None:
    q, k, v, scale, (kc, vc), ctx_for = _step((4, 2, 16, 16), torch.float32, pad=0)
    ctx = ctx_for((kc.clone(), vc.clone()))
    ctx.slot_mapping[0] = -1
    before = ctx.kv_caches[0][0].clone()
    with step_context(ctx):
        torch.ops.skybroker.paged_attention(q, k, v, 0, scale, None)
    written = ctx.kv_caches[0][0].view(-1, 2, 16)[ctx.slot_mapping[1:]]
    assert torch.equal(written, k[1 : len(ctx.slot_mapping)])
    changed = (ctx.kv_caches[0][0] != before).view(-1, 2 * 16).any(-1).nonzero().flatten()
    assert sorted(changed.tolist()) == sorted(ctx.slot_mapping[1:].tolist())
    with pytest.raises(RuntimeError, match=r"inside kernels\.attention_op\.step_context"):
        torch.ops.skybroker.paged_attention(q, k, v, 0, scale, None)
    with step_context(ctx), pytest.raises(RuntimeError, match="has no KV cache"):
        torch.ops.skybroker.paged_attention(q, k, v, 1, scale, None)


def test_next_layer_walks_the_layers_in_order_on_both_paths() -> None:
    """A call with NEXT_LAYER (what the compiled model passes) attends layer 0, 1, ... of each
    forward and wraps around, so the same calls with explicit indices write the same caches."""
    q, k, v, scale, (kc, vc), ctx_for = _step((4, 2, 16, 16), torch.float32, pad=0)

    def three_layers() -> StepContext:
        ctx = ctx_for((kc, vc))
        ctx.kv_caches = [(kc.clone(), vc.clone()) for _ in range(3)]
        return ctx

    want_ctx = three_layers()
    with step_context(want_ctx):
        for layer in (0, 1, 2):
            attention_op.attend(q * (layer + 1), k * (layer + 1), v, layer, scale, None)
    for op in (attention_op.attend, torch.ops.skybroker.paged_attention):
        ctx = three_layers()
        with step_context(ctx):
            for layer in (0, 1, 2, 0):  # a second forward in the same context starts again
                op(q * (layer + 1), k * (layer + 1), v, attention_op.NEXT_LAYER, scale, None)
        for (gk, gv), (wk, wv) in zip(ctx.kv_caches, want_ctx.kv_caches, strict=True):
            assert torch.equal(gk, wk) and torch.equal(gv, wv)


def test_no_compiler_or_a_build_error_warns_and_keeps_the_torch_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_attention, "_loaded", None)
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.warns(RuntimeWarning, match=r"not used \(RuntimeError: no C\+\+ compiler"):
        load_cpu_attention(str(tmp_path))
    monkeypatch.delenv("CXX")
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_attention, "SOURCE", bad)
    with pytest.warns(RuntimeWarning, match=r"(?s)building bad\.cpp failed.*attention runs torch"):
        load_cpu_attention(str(tmp_path))
    assert not cpu_attention.is_loaded() and not list(tmp_path.glob("*.so"))


def test_library_is_cached_by_source_and_torch(tmp_path: Path) -> None:
    path = cpu_attention.library_path(tmp_path)
    assert path.parent == tmp_path and path.name.startswith("skybroker_cpu_attention-")
    assert path == cpu_attention.library_path(tmp_path)
    assert cpu_attention.is_loaded()


def test_loading_the_kernel_keeps_subnormal_floats() -> None:
    """The library is linked without crtfastmath.o: loading it must not set flush-to-zero for
    the whole process (tiny floats in requests would read as 0)."""
    tiny = float("5e-324")
    assert cpu_attention.is_loaded()
    assert tiny * 1.0 > 0.0
    assert torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() > 0.0
