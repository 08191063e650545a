"""Perf model: architecture figures, roofline sanity, scheduler simulation, capacity, profiles."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from skybroker.models import KNOWN_MODELS, from_gguf, from_hf_config, lookup, normalize_name
from skybroker.perf import profile as prof
from skybroker.perf.capacity import SLOTarget, evaluate, max_rate, saturated_throughput
from skybroker.perf.roofline import Hardware, RooflineModel, kv_capacity_tokens
from skybroker.perf.simulator import SchedulerConfig, simulate
from skybroker.perf.workload import RequestClass, read_trace, request_classes, sample_lengths
from skybroker.spec import LengthDist

H100 = Hardware("gpu", "H100", 1, 80, 3350, 989, 900)


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SKYBROKER_HOME", str(tmp_path))
    monkeypatch.setenv("SKYBROKER_PERF_CACHE", "0")


@pytest.mark.parametrize(
    ("name", "billions"),
    [("meta-llama/Llama-3.1-8B-Instruct", 8.03), ("meta-llama/Llama-3.3-70B-Instruct", 70.55),
     ("Qwen/Qwen2.5-7B-Instruct", 7.62), ("Qwen/Qwen2.5-72B-Instruct", 72.7),
     ("mistralai/Mistral-7B-Instruct-v0.3", 7.25), ("HuggingFaceTB/SmolLM2-135M-Instruct", 0.1345),
     ("HuggingFaceTB/SmolLM2-360M", 0.362), ("HuggingFaceTB/SmolLM2-1.7B-Instruct", 1.71)],
)  # fmt: skip
def test_known_model_param_counts(name: str, billions: float) -> None:
    arch = lookup(name)
    assert arch is not None, normalize_name(name)
    assert arch.num_params / 1e9 == pytest.approx(billions, rel=0.01)


def test_hf_config_and_gguf_header(tmp_path: Path) -> None:
    import gguf

    ref = KNOWN_MODELS["smollm2-135m"]
    cfg = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
           "num_hidden_layers": 30, "intermediate_size": 1536, "vocab_size": 49152,
           "tie_word_embeddings": True, "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}  # fmt: skip
    assert from_hf_config(cfg).num_params == ref.num_params
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        from_hf_config({"num_attention_heads": 2})
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(30)
    w.add_embedding_length(576)
    w.add_head_count(9)
    w.add_head_count_kv(3)
    w.add_feed_forward_length(1536)
    w.add_context_length(8192)
    w.add_tensor("token_embd.weight", np.zeros((49152, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    arch = from_gguf(path)
    assert (arch.num_layers, arch.hidden_size, arch.num_kv_heads, arch.vocab_size) == (
        30,
        576,
        3,
        49152,
    )
    assert arch.tie_word_embeddings and arch.num_params == ref.num_params


def test_8b_decode_on_h100_is_memory_bound() -> None:
    arch = lookup("llama-3.1-8b")
    m = RooflineModel(arch, H100)
    t = m.step_time(0, 1, 512) - m.host_s(1)
    floor = arch.weight_bytes / (H100.bandwidth_gbs * 1e9)
    assert floor <= t <= floor / m.memory_eff * 1.01  # weights / bandwidth, within the efficiency
    assert 2 * arch.num_params / (H100.tflops * 1e12) < t / 10  # compute is far below


def test_70b_fits_only_on_several_80gb_gpus() -> None:
    arch = lookup("llama-3.3-70b")
    assert kv_capacity_tokens(arch, H100) < 0  # 141 GB of bf16 weights on one 80 GB GPU
    four = Hardware("gpu", "H100", 4, 80, 3350, 989, 900)
    assert kv_capacity_tokens(arch, four) > 100_000
    tp2 = RooflineModel(arch, Hardware("gpu", "H100", 2, 80, 3350, 989, 900))
    tp4 = RooflineModel(arch, four)
    assert tp4.step_time(0, 8, 8000) < tp2.step_time(0, 8, 8000)  # more GPUs, faster steps


@dataclass(frozen=True)
class ConstStep:
    """Step time = a + b * tokens: easy to reason about in simulator tests."""

    a: float = 0.01
    b: float = 0.001
    source: str = "const"

    def step_time(self, p: float, d: float, c: float, pairs: float = 0.0) -> float:
        return self.a + self.b * (p + d)


def test_single_request_latencies() -> None:
    r = simulate(
        ConstStep(),
        SchedulerConfig(8, 64, 100, 16),
        np.array([0.0]),
        np.array([100]),
        np.array([11]),
    )
    # prompt 100 with a 64-token budget: two prefill chunks, then 10 decode steps
    assert r.ttft[0] == pytest.approx((0.01 + 0.064) + (0.01 + 0.036))
    assert r.tpot[0] == pytest.approx(0.011)
    assert r.num_steps == 12


def test_prefix_cached_prompt_tokens_are_not_prefilled() -> None:
    cfg = SchedulerConfig(8, 64, 100, 16)
    one = (np.array([0.0]), np.array([100]), np.array([11]))
    r = simulate(ConstStep(), cfg, *one, cached_lens=np.array([96]))
    # 96 of 100 prompt tokens in the cache: one 4-token prefill step, then 10 decode steps
    assert r.ttft[0] == pytest.approx(0.01 + 0.004)
    assert r.tpot[0] == pytest.approx(0.011)
    assert r.num_steps == 11
    cold = simulate(ConstStep(), cfg, *one, cached_lens=np.array([0]))
    assert cold.ttft[0] == simulate(ConstStep(), cfg, *one).ttft[0]


def test_a_preempted_request_finds_its_cached_prefix_again() -> None:
    rng = np.random.default_rng(0)
    n = 40
    ins, outs = rng.integers(20, 60, n), rng.integers(20, 80, n)
    cfg = SchedulerConfig(16, 256, 30, 16)
    cold = simulate(ConstStep(), cfg, np.zeros(n), ins, outs)
    warm = simulate(ConstStep(), cfg, np.zeros(n), ins, outs, cached_lens=(ins - 1) // 16 * 16)
    assert warm.num_preemptions > 0 and np.isfinite(warm.finish).all()
    assert warm.finish.max() < cold.finish.max()  # recompute only the uncached tail


def test_preemption_recomputes_and_loses_nothing() -> None:
    rng = np.random.default_rng(0)
    n = 40
    ins, outs = rng.integers(20, 60, n), rng.integers(20, 80, n)
    tight = simulate(ConstStep(), SchedulerConfig(16, 256, 30, 16), np.zeros(n), ins, outs)
    roomy = simulate(ConstStep(), SchedulerConfig(16, 256, 10_000, 16), np.zeros(n), ins, outs)
    assert tight.num_preemptions > 0 and roomy.num_preemptions == 0
    assert np.isfinite(tight.finish).all() and np.isfinite(roomy.finish).all()
    assert tight.finish.max() > roomy.finish.max()  # recompute costs time


def test_max_num_seqs_caps_the_batch() -> None:
    n = 20
    one = simulate(
        ConstStep(),
        SchedulerConfig(1, 512, 10_000, 16),
        np.zeros(n),
        np.full(n, 10),
        np.full(n, 10),
    )
    many = simulate(
        ConstStep(),
        SchedulerConfig(20, 512, 10_000, 16),
        np.zeros(n),
        np.full(n, 10),
        np.full(n, 10),
    )
    assert (one.num_steps, many.num_steps) == (200, 10)  # one at a time vs one batch
    assert one.finish.max() > 4 * many.finish.max()


@pytest.mark.parametrize("n", [60, 200])  # 200: bracketed by a search on COARSE_REQUESTS
def test_capacity_meets_slo_and_is_tight(n: int) -> None:
    arch = lookup("llama-3.1-8b")
    # a fixed host time: the SLO below is set against it (the recorded one is measured)
    model = RooflineModel(arch, H100, overhead_s=0.004, overhead_per_seq_s=0.0)
    cfg = SchedulerConfig(64, 2048, kv_capacity_tokens(arch, H100) // 16, 16)
    rng = np.random.default_rng(1)
    cls = RequestClass(
        "chat",
        1.0,
        tuple(rng.integers(100, 400, 64).tolist()),
        tuple(rng.integers(50, 200, 64).tolist()),
    )
    slo = SLOTarget(0.3, 0.0108, 90)  # TPOT binds below saturation
    cap = max_rate(model, cfg, cls, slo, num_requests=n)
    assert cap.rate > 0
    ttft, tpot = evaluate(model, cfg, cls, cap.rate, slo, num_requests=n)
    assert ttft <= slo.ttft_s and tpot <= slo.tpot_s
    # tight: either the replica is saturated, or a bit more load breaks the SLO
    sat = saturated_throughput(model, cfg, cls)
    assert cap.rate <= sat * 1.0001
    if cap.rate < 0.95 * sat:
        ttft, tpot = evaluate(model, cfg, cls, cap.rate * 1.1, slo, num_requests=n)
        assert ttft > slo.ttft_s or tpot > slo.tpot_s
    looser = max_rate(model, cfg, cls, SLOTarget(0.5, 0.04, 90), num_requests=n)
    assert looser.rate > cap.rate
    impossible = max_rate(model, cfg, cls, SLOTarget(0.5, 0.001, 90), num_requests=n)
    assert impossible.rate == 0


def test_length_sampling_and_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = sample_lengths(LengthDist(mean=600, p50=400, p99=3000), 20000, rng)
    assert np.percentile(x, 50) == pytest.approx(400, rel=0.05)
    assert np.percentile(x, 99) == pytest.approx(3000, rel=0.1)
    h = sample_lengths(LengthDist(histogram=[(100, 1), (1000, 3)]), 4000, rng)
    assert set(np.unique(h)) == {100, 1000} and (h == 1000).mean() == pytest.approx(0.75, abs=0.03)
    classes = request_classes(x, sample_lengths(LengthDist(mean=200, p99=1500), 20000, rng))
    assert 2 <= len(classes) <= 20 and sum(c.share for c in classes) == pytest.approx(1)
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"input_tokens": 10, "output_tokens": 5}\n\n{"input_tokens": 7, "output_tokens": 3}\n'
    )
    ins, outs = read_trace(trace)
    assert ins.tolist() == [10, 7] and outs.tolist() == [5, 3]
    trace.write_text('{"input_tokens": 10}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:1"):
        read_trace(trace)


def _profile_points(a: float, p: float, d: float, c: float) -> list[dict]:
    pts = []
    for pre, dec, ctx in [
        (512, 0, 512),
        (0, 8, 4000),
        (0, 32, 20000),
        (256, 16, 9000),
        (1024, 4, 6000),
        (0, 1, 100),
    ]:
        pts.append({"num_prefill_tokens": pre, "num_decode_seqs": dec, "total_context_tokens": ctx,
                    "seconds": a + p * pre + d * dec + c * ctx})  # fmt: skip
    return pts


def test_profile_roundtrip_fit_and_match(tmp_path: Path) -> None:
    arch = lookup("smollm2-135m")
    data = {"schema": prof.SCHEMA, "hardware": {"kind": "gpu", "name": "H100", "count": 1},
            "model": {"name": "SmolLM2-135M", "arch_hash": arch.arch_hash},
            "points": _profile_points(0.004, 2e-5, 3e-4, 1e-7)}  # fmt: skip
    p = prof.validate(data)
    assert p.fit["intercept"] == pytest.approx(0.004, rel=1e-6)
    assert p.fit["per_context_token"] == pytest.approx(1e-7, rel=1e-4)
    path = tmp_path / "h100.json"
    prof.save(p, path)
    loaded = prof.load(path)
    assert loaded.fit == pytest.approx(p.fit)
    found = prof.find_profile(arch, H100, [str(path)])
    assert found is not None and found.source == f"profile:{path}"
    assert found.step_time(512, 0, 512) == pytest.approx(0.004 + 2e-5 * 512 + 1e-7 * 512)
    assert prof.find_profile(lookup("llama-3.1-8b"), H100, [str(path)]) is None
    assert prof.find_profile(arch, Hardware("gpu", "L4", 1, 24, 300, 121), [str(path)]) is None


@pytest.mark.parametrize(
    ("patch", "expect"),
    [({"schema": "v0"}, "schema must be"), ({"hardware": {"kind": "tpu", "name": "x", "count": 1}}, "hardware needs"),
     ({"points": []}, "at least 4"), ({"model": {}}, "model needs")],
)  # fmt: skip
def test_profile_validation_errors(patch: dict, expect: str, tmp_path: Path) -> None:
    data = {"schema": prof.SCHEMA, "hardware": {"kind": "cpu", "name": "AMD EPYC", "count": 2},
            "model": {"name": "SmolLM2-135M"}, "points": _profile_points(0.01, 1e-4, 1e-3, 0)}  # fmt: skip
    data.update(patch)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(prof.ProfileError, match=expect):
        prof.load(path)


def test_early_stop_gives_the_full_simulations_verdict() -> None:
    from skybroker.perf.simulator import StopRule

    model = RooflineModel(lookup("llama-3.1-8b"), Hardware("gpu", "L4", 1, 24, 300, 121))
    cfg = SchedulerConfig(32, 2048, 4000, 16)
    rng = np.random.default_rng(3)
    n, stopped = 40, 0
    ins, outs = rng.integers(50, 1500, n), rng.integers(10, 300, n)
    gaps = np.cumsum(rng.exponential(1.0, n))
    for pct in (50, 90, 99):
        slo = SLOTarget(1.0, 0.06, pct)
        rule = StopRule(slo.ttft_s, slo.tpot_s, pct)
        for rate in (0.1, 0.3, 0.6, 1.0, 2.0, 5.0):
            full = simulate(model, cfg, gaps / rate, ins, outs)
            fast = simulate(model, cfg, gaps / rate, ins, outs, stop=rule)
            ttft, tpot = full.percentile(pct)
            met = ttft <= slo.ttft_s and tpot <= slo.tpot_s
            assert not (fast.stopped and met), (pct, rate)  # stops only on a sure miss
            if fast.stopped:  # a lower bound of the miss, never more than the real one
                assert 1 < fast.excess <= max(ttft / slo.ttft_s, tpot / slo.tpot_s) + 1e-9
                stopped += 1
            else:
                assert fast.percentile(pct) == pytest.approx((ttft, tpot))
    assert stopped >= 3


def test_parallel_searches_equal_serial_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from skybroker.perf import capacity

    monkeypatch.setattr(capacity, "MIN_PARALLEL_JOBS", 8)  # 8 jobs: through the pool

    arch = lookup("llama-3.1-8b")
    rng = np.random.default_rng(2)
    jobs = []
    for hw in (H100, Hardware("gpu", "L4", 1, 24, 300, 121)):
        cfg = SchedulerConfig(32, 2048, max(kv_capacity_tokens(arch, hw), 4096) // 16, 16)
        for k in range(4):
            cls = RequestClass(f"c{k}", 0.25, tuple(rng.integers(50, 300, 20).tolist()),
                               tuple(rng.integers(5, 60, 20).tolist()))  # fmt: skip
            jobs.append((RooflineModel(arch, hw), cfg, cls, SLOTarget(1.5, 0.08, 90)))
    serial = capacity.max_rates(jobs, num_requests=20, workers=1)
    capacity._memo.clear()
    capacity._dirty.clear()
    parallel = capacity.max_rates(jobs, num_requests=20, workers=2)
    assert parallel == serial and any(r.rate > 0 for r in serial)


def test_roofline_prices_the_engines_measured_host_time() -> None:
    from skybroker.perf import roofline

    data = json.loads(roofline._host_overhead_file().read_text())
    assert data["cpu"] and data["measured"] and data["command"].startswith("python benchmarks/")
    arch = lookup("llama-3.1-8b")
    m = RooflineModel(arch, H100)
    base, per_seq = roofline.engine_host_overhead(arch.num_layers, "compiled")
    assert (m.overhead_s, m.overhead_per_seq_s) == (base, per_seq)
    fit = data["steps"]["compiled"]["fit"]
    assert base == pytest.approx(fit[0] + fit[1] * 32)
    for p in data["steps"]["compiled"]["points"]:  # the fit follows what was measured
        est = sum(
            roofline.engine_host_overhead(p["num_layers"], "compiled")
            * np.array([1, p["num_seqs"]])
        )
        assert est == pytest.approx(p["seconds"], rel=0.35, abs=5e-4)
    eager = roofline.engine_host_overhead(32, "eager")
    assert eager[0] + 64 * eager[1] > base + 64 * per_seq  # compiling takes host time off
    fast = m.fast_step()
    for d in (1, 8, 64):
        assert fast(0, d, 512 * d) == pytest.approx(m.step_time(0, d, 512 * d))
    assert m.step_time(0, 64, 0) - m.step_time(0, 1, 0) >= 63 * per_seq * 0.999
    explicit = RooflineModel(arch, H100, overhead_s=0.004, overhead_per_seq_s=0.0)
    assert explicit.step_time(0, 1, 512) == pytest.approx(
        m.step_time(0, 1, 512) - m.host_s(1) + 0.004
    )
