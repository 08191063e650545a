"""Engine tests: exact greedy agreement with `transformers`, paging, batching, sampling, API."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from engine import LLM, EngineArgs, LLMEngine, SamplingParams
from engine.block_manager import BlockManager
from engine.sequence import Sequence

PROMPTS = [
    "the cat and the dog run in the city",
    "hello world what is the capital of france",
    "a",
    "red blue green small large quick slow old new run jump fly swim sing read write see paris",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new: int, **kw) -> list[int]:

    model = _hf_model(model_dir)
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, **kw)
    return out[0, len(prompt_ids) :].tolist()


_HF_CACHE: dict[Path, object] = {}


def _hf_model(model_dir: Path):
    import transformers as tf

    if model_dir not in _HF_CACHE:
        _HF_CACHE[model_dir] = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return _HF_CACHE[model_dir]


def make_llm(model_dir: Path, **kw) -> LLM:
    kw.setdefault("max_model_len", 256)
    kw.setdefault("num_kv_blocks", 128)
    kw.setdefault("block_size", 4)
    return LLM(str(model_dir), **kw)


@pytest.fixture(scope="module")
def llama_llm(tiny_llama_dir: Path) -> LLM:
    return make_llm(tiny_llama_dir)


# -- block manager ------------------------------------------------------------------------
def _seq(tokens: list[int], n: int = 1) -> Sequence:
    return Sequence("r", tokens, SamplingParams(n=n, max_tokens=4))


def test_block_manager_prefix_hits_and_lru_eviction() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    a = _seq(list(range(10)))
    bm.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    assert len(a.block_table) == 3 and len(a.block_hashes) == 2
    b = _seq([*list(range(8)), 99, 98, 97])
    hits, hashes = bm.get_computed_blocks(b)
    assert hits == a.block_table[:2] and hashes == a.block_hashes
    bm.free(a)
    assert bm.num_free_blocks == 6  # cached blocks count as free...
    hits, _ = bm.get_computed_blocks(b)
    assert len(hits) == 2  # ...but keep their contents until evicted
    bm.allocate_slots(b, 3, hits, hashes)
    assert b.num_computed_tokens == 8 and b.block_table[:2] == hits
    assert bm.prefix_hit_rate == 0.0  # only the scheduler records queries


def test_block_manager_evicts_cached_blocks_lru_and_uncached_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _seq(list(range(8)))
    bm.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    head, tail = a.block_table
    bm.free(a)  # frees tail first: tail is the least recently used cached block
    c = _seq(list(range(100, 108)))
    bm.allocate_slots(c, 8)  # takes the two uncached blocks
    assert set(c.block_table).isdisjoint({head, tail})
    d = _seq([7, 7, 7])
    bm.allocate_slots(d, 3)  # must evict a cached block: the tail goes first
    assert d.block_table == [tail]
    hits, _ = bm.get_computed_blocks(_seq([*list(range(8)), 1]))
    assert hits == [head]
    assert not bm.can_allocate(_seq([1, 2, 3, 4, 5]), 5)


def test_block_manager_full_hit_recomputes_last_token() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _seq(list(range(8)))
    bm.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    hits, _ = bm.get_computed_blocks(_seq(list(range(8))))
    assert len(hits) == 1  # the block holding the last token is recomputed, not shared


def test_block_manager_fork_and_copy_on_write() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    parent = _seq(list(range(6)), n=2)
    bm.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    child = parent.fork(1)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert bm.num_used_blocks == 2
    child.token_ids.append(7)
    copies = bm.allocate_slots(child, 1)
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]
    assert bm.num_used_blocks == 3
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8


# -- exactness against transformers -------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_mistral_dir"])
def test_greedy_matches_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    llm = make_llm(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=20)  # as HF's min_new_tokens
    outs = llm.generate(PROMPTS, params)
    for out in outs:
        expected = hf_greedy(model_dir, out.prompt_token_ids, 20)
        assert out.outputs[0].token_ids == expected, out.prompt
        assert out.outputs[0].finish_reason == "length"


def test_tokenizer_and_chat_template_match_transformers(
    tiny_llama_dir: Path, llama_llm: LLM
) -> None:
    import transformers as tf

    ref = tf.AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok = llama_llm.get_tokenizer()
    for text in [*PROMPTS, "  spaces\n\ttabs 123 <|im_start|> naïve"]:
        assert tok.encode(text) == ref(text).input_ids
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    )
    ids = tok.encode("the cat and the dog")
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_repetition_penalty_matches_transformers(tiny_llama_dir: Path, llama_llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12, repetition_penalty=1.5)
    out = llama_llm.generate(PROMPTS[0], params)[0]
    expected = hf_greedy(tiny_llama_dir, out.prompt_token_ids, 12, repetition_penalty=1.5)
    assert out.outputs[0].token_ids == expected


# -- paging and batching do not change results --------------------------------------------
def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_prefix_caching_on_off_and_chunked_prefill_equal(tiny_llama_dir: Path) -> None:
    system = "the quick dog and the slow cat see a red star in the blue sky "
    prompts = [system + p for p in PROMPTS]
    on = make_llm(tiny_llama_dir, enable_prefix_caching=True)
    first = on.generate(prompts[:1], GREEDY)
    rest = on.generate(prompts, GREEDY)
    assert on.llm_engine.get_metrics().prefix_cache_hit_rate > 0.3
    assert rest[1].num_cached_tokens > 0
    off = make_llm(tiny_llama_dir, enable_prefix_caching=False)
    ref = off.generate(prompts, GREEDY)
    assert off.llm_engine.get_metrics().prefix_cache_hit_rate == 0
    assert _tokens(rest) == _tokens(ref)
    assert _tokens(first) == _tokens(ref[:1])
    chunked = make_llm(tiny_llama_dir, max_num_batched_tokens=7)
    assert _tokens(chunked.generate(prompts, GREEDY)) == _tokens(ref)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_keeps_outputs(
    tiny_llama_dir: Path, llama_llm: LLM, prefix_caching: bool
) -> None:
    prompts = PROMPTS * 3
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    ref = llama_llm.generate(prompts, params)
    small = make_llm(
        tiny_llama_dir, num_kv_blocks=40, max_model_len=96, enable_prefix_caching=prefix_caching
    )
    outs = small.generate(prompts, params)
    metrics = small.llm_engine.get_metrics()
    assert metrics.num_preemptions > 0
    assert _tokens(outs) == _tokens(ref)
    assert metrics.kv_blocks_used == 0 or prefix_caching is False
    assert small.llm_engine.block_manager.num_free_blocks == 40


# -- sampling -----------------------------------------------------------------------------
def test_n_samples_share_prompt_blocks(tiny_llama_dir: Path) -> None:
    prompt = list(range(10, 30))  # 20 tokens = 5 full blocks of 4
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)

    def peak_blocks(reqs: list[tuple[str, SamplingParams]]) -> int:
        eng = make_llm(tiny_llama_dir, enable_prefix_caching=False).llm_engine
        for rid, p in reqs:
            eng.add_request(rid, prompt, p)
        peak, outs = 0, {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                outs[o.request_id] = o
            peak = max(peak, eng.get_metrics().kv_blocks_used)
        return peak, outs

    shared, outs = peak_blocks([("a", params)])
    single = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    separate, _ = peak_blocks([(f"s{i}", single) for i in range(4)])
    assert shared < separate
    samples = outs["a"].outputs
    assert [c.index for c in samples] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in samples)
    assert len({tuple(c.token_ids) for c in samples}) > 1


def test_seeded_sampling_is_reproducible(llama_llm: LLM) -> None:
    def run(seed: int, batch: list[str]) -> list[int]:
        params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=seed, max_tokens=16)]
        params += [SamplingParams(temperature=1.0, max_tokens=5)] * (len(batch) - 1)
        return llama_llm.generate(batch, params)[0].outputs[0].token_ids

    a = run(7, PROMPTS[:1])
    assert run(7, PROMPTS) == a  # other requests in the batch do not matter
    assert run(8, PROMPTS[:1]) != a


def test_stop_strings_and_stop_tokens_cut_exactly(llama_llm: LLM) -> None:
    full = llama_llm.generate(PROMPTS[1], GREEDY)[0].outputs[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = llama_llm.generate(
        PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    )
    out = cut[0].outputs[0]
    assert out.text == full.text[: full.text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    stop_id = full.token_ids[4]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id])
    out = llama_llm.generate(PROMPTS[1], params)[0].outputs[0]
    assert out.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop"


def test_logprobs_and_min_tokens(llama_llm: LLM) -> None:
    out = llama_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, logprobs=3))
    comp = out[0].outputs[0]
    assert comp.logprobs is not None and len(comp.logprobs) == len(comp.token_ids)
    for tok, lp in zip(comp.token_ids, comp.logprobs, strict=True):
        assert tok in lp and max(lp.values()) == lp[tok] <= 0.0
    eos = llama_llm.llm_engine.eos_token_ids
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=6, min_tokens=6)
    comp = llama_llm.generate(PROMPTS, params)
    assert all(len(o.outputs[0].token_ids) == 6 for o in comp)
    assert all(not eos & set(o.outputs[0].token_ids) for o in comp)


# -- API and bad input --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_p": 2}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_invalid_sampling_params(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_bad_requests_raise_value_error(llama_llm: LLM, tiny_llama_dir: Path) -> None:
    eng = llama_llm.llm_engine
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request("x", "", GREEDY)
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request("x", [], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request("x", [5] * 300, GREEDY)
    with pytest.raises(ValueError, match="prompt token ids"):
        eng.add_request("x", [10**6], GREEDY)
    with pytest.raises(ValueError, match="block_size"):
        EngineArgs(model=str(tiny_llama_dir), block_size=3)
    with pytest.raises(ValueError, match="model"):
        EngineArgs(model="/nonexistent/model")
    assert not eng.has_unfinished_requests()


def test_engine_step_api_abort_and_metrics(tiny_llama_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "steps.jsonl"
    eng = LLMEngine.from_args(
        EngineArgs(
            model=str(tiny_llama_dir),
            num_kv_blocks=64,
            block_size=4,
            max_model_len=256,
            step_log=str(log),
        )
    )
    assert eng.model_name == tiny_llama_dir.name and eng.max_model_len == 256
    eng.add_request(
        "keep", PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    )
    eng.add_request(
        "drop", PROMPTS[1], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    )
    outs = eng.step()
    assert {o.request_id for o in outs} == {"keep", "drop"}
    m = eng.get_metrics()
    assert m.num_running == 2 and m.kv_blocks_used > 0 and 0 <= m.kv_waste < 1
    assert m.recent_steps[-1].num_prefill_seqs == 2
    eng.abort_request("drop")
    finals = []
    while eng.has_unfinished_requests():
        finals += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in finals] == ["keep"]
    assert len(finals[0].outputs[0].token_ids) == 5
    assert eng.get_metrics().kv_blocks_used == 0
    # --step-log: one JSON line per step, the same figures as recent_steps, in start order
    eng.shutdown()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    steps = eng.get_metrics().recent_steps
    assert len(lines) == len(steps) == 5
    assert [x["num_decode_seqs"] for x in lines] == [s.num_decode_seqs for s in steps]
    assert lines[0]["num_prefill_seqs"] == 2 and lines[1]["num_decode_seqs"] == 1
    lens = [len(eng.tokenizer.encode(p)) for p in PROMPTS[:2]]
    assert lines[0]["prefill_attn_pairs"] == pytest.approx(sum(n * n / 2 for n in lens))
    # the step that finishes "keep" counts its context before the blocks are freed
    assert lines[-1]["num_context_tokens"] == lens[0] + 4
    assert all(a["start"] + a["duration_s"] <= b["start"] for a, b in pairwise(lines))


def test_chat_applies_template(llama_llm: LLM) -> None:
    out = llama_llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=3))
    tok = llama_llm.get_tokenizer()
    assert tok.decode(out[0].prompt_token_ids, skip_special_tokens=False).startswith(
        "<|im_start|>user"
    )


# -- the real model -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.filterwarnings("error:The given NumPy array is not writable:UserWarning")
def test_smollm2_gguf_matches_transformers_and_knows_paris(smollm2_gguf: Path) -> None:
    import transformers as tf

    llm = LLM(str(smollm2_gguf), max_model_len=256, kv_cache_gib=0.05)
    ref_tok = tf.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tok = llm.get_tokenizer()
    for text in ["Hello world 12345 naïve café", "  spaces\n\nnew\tlines <|im_start|>"]:
        assert tok.encode(text) == ref_tok(text).input_ids
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(msgs) == ref_tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    )
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=12))[0]
    assert "Paris" in out.outputs[0].text
    ref = tf.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([out.prompt_token_ids])
    expected = ref.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()
    n = len(out.outputs[0].token_ids)
    assert out.outputs[0].token_ids == expected[:n]


@pytest.mark.slow
def test_tensor_parallel_2_matches_tp_1(tiny_llama_dir: Path, llama_llm: LLM) -> None:
    ref = llama_llm.generate(PROMPTS, GREEDY)
    tp = make_llm(tiny_llama_dir, tensor_parallel_size=2)
    try:
        assert tp.llm_engine.runner.model.layers[0].self_attn.num_heads == 2
        assert _tokens(tp.generate(PROMPTS, GREEDY)) == _tokens(ref)
    finally:
        tp.shutdown()


def test_freeze_heap_leaves_full_collections_only_what_came_after() -> None:
    import gc

    from engine.llm_engine import freeze_heap

    before = len(gc.get_objects())
    try:
        freeze_heap()
        assert gc.get_freeze_count() >= before // 2
        assert len(gc.get_objects()) < before // 10

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made after the freeze is still collected
        del a, b
        assert gc.collect() >= 2
    finally:
        gc.unfreeze()


def test_generate_steps_with_the_heap_frozen_and_leaves_it_as_it_was(llama_llm: LLM) -> None:
    import gc

    engine = llama_llm.llm_engine
    seen: list[int] = []
    step = engine.step

    def recording(*a, **kw):
        seen.append(gc.get_freeze_count())
        return step(*a, **kw)

    engine.step = recording
    try:
        llama_llm.generate(PROMPTS[:2], GREEDY)
        assert seen and min(seen) > 0 and gc.get_freeze_count() == 0
        gc.freeze()  # a serving process's frozen heap stays frozen
        frozen = gc.get_freeze_count()
        llama_llm.generate(PROMPTS[:1], GREEDY)
        assert gc.get_freeze_count() > frozen // 2  # (frozen objects freed since count off)
    finally:
        gc.unfreeze()
        del engine.step
