"""The compiled model step: token-for-token equal to eager and to `transformers` (with
preemption, prefix caching and chunked prefill), its fallback, its defaults; the lean loop's
deferred detokenization equals the streaming one."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from engine import EngineArgs, SamplingParams
from engine.compiled_step import capture_sizes
from kernels import cpu_attention
from tests.test_engine import PROMPTS, hf_greedy, make_llm

SYSTEM = "the quick dog and the slow cat see a red star in the blue sky "


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_capture_sizes_and_padding(tiny_llama_dir: Path) -> None:
    assert capture_sizes(2048) == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048]
    assert capture_sizes(7) == [2, 4, 7]
    assert capture_sizes(1) == [2]


def test_compile_defaults_off_on_cpu_on_for_cuda(tiny_llama_dir: Path) -> None:
    args = EngineArgs(model=str(tiny_llama_dir))
    assert args.compiles(torch.device("cuda")) and not args.compiles(torch.device("cpu"))
    assert EngineArgs(model=str(tiny_llama_dir), enforce_eager=False).compiles(torch.device("cpu"))
    assert not EngineArgs(model=str(tiny_llama_dir), enforce_eager=True).compiles(
        torch.device("cuda")
    )
    assert make_llm(tiny_llama_dir).llm_engine.runner.compiled is None
    assert args.cpp_wrapper(torch.device("cpu")) and not args.cpp_wrapper(torch.device("cuda"))
    no_cpp = EngineArgs(model=str(tiny_llama_dir), compile_cpp_wrapper=False)
    assert not no_cpp.cpp_wrapper(torch.device("cpu"))


def test_compile_failure_falls_back_to_eager_with_one_warning(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file where the compile cache directory should be")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = make_llm(tiny_llama_dir, enforce_eager=False, compile_cache_dir=str(not_a_dir))
        out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=6))
    ours = [w for w in caught if "runs the model eager" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "FileExistsError" in str(ours[0].message)
    assert llm.llm_engine.runner.compiled is None
    assert all(len(o.outputs[0].token_ids) == 6 for o in out)


def test_deferred_text_equals_streamed_text(tiny_llama_dir: Path) -> None:
    llama_llm = make_llm(tiny_llama_dir)
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=24, skip_special_tokens=False)
    offline = llama_llm.generate(PROMPTS, params)
    eng = llama_llm.llm_engine
    for i, prompt in enumerate(PROMPTS):
        eng.add_request(f"stream-{i}", prompt, params)
    streamed = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            streamed[o.request_id] = o
    for i, o in enumerate(offline):
        s = streamed[f"stream-{i}"].outputs[0]
        assert (s.token_ids, s.text) == (o.outputs[0].token_ids, o.outputs[0].text)
        assert o.outputs[0].text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fixture", "cpp_wrapper"),
    [
        ("tiny_llama_dir", None),  # the CPU default: inductor's C++ wrapper
        ("tiny_qwen2_dir", None),
        ("tiny_mistral_dir", None),
        ("tiny_llama_dir", False),  # the Python wrapper (the CUDA default): one layer compiled
        ("tiny_mistral_dir", False),  # ... with a sliding window
    ],
)
def test_compiled_equals_eager_and_transformers(
    fixture: str,
    cpp_wrapper: bool | None,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """One compiled engine per model, small enough to preempt, with prefix caching and a
    16-token budget (so the longer prompts prefill in chunks); attention runs the C++ kernel,
    the eager engine the torch path."""
    model_dir: Path = request.getfixturevalue(fixture)
    kw = dict(num_kv_blocks=48, max_model_len=96, max_num_batched_tokens=16)
    cache = str(tmp_path_factory.mktemp("compile-cache"))
    compiled = make_llm(
        model_dir,
        enforce_eager=False,
        compile_cache_dir=cache,
        compile_cpp_wrapper=cpp_wrapper,
        **kw,
    )
    assert compiled.llm_engine.runner.compiled is not None
    assert cpu_attention.is_loaded()  # the compiled step's attention is the C++ kernel
    eager = make_llm(model_dir, enforce_eager=True, **kw)
    prompts = [SYSTEM + p for p in PROMPTS] * 2 + PROMPTS
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)
    got = compiled.generate(prompts, params)
    metrics = compiled.llm_engine.get_metrics()
    assert metrics.num_preemptions > 0 and metrics.prefix_cache_hit_rate > 0
    assert _tokens(got) == _tokens(eager.generate(prompts, params))
    for out in got[:4] + got[-4:]:
        assert out.outputs[0].token_ids == hf_greedy(model_dir, out.prompt_token_ids, 24)
    assert compiled.llm_engine.runner.compiled is not None  # no fallback happened on the way
