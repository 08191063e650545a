"""Measured engine profiles: format round trip, matching (wrong model / hardware not used, with
a note saying why), the planner's use of a matching profile, and the scheduler simulation on a
synthetic profile against hand-computed queueing cases."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from skybroker.models import lookup
from skybroker.perf.profile import (
    SCHEMA,
    ProfileError,
    ProfileModel,
    find_profile,
    fit_points,
    load,
    save,
    validate,
)
from skybroker.perf.roofline import Hardware
from skybroker.perf.simulator import SchedulerConfig, simulate

CPU = Hardware("cpu", "Test CPU 9000", 2, 24.0, 10.0, 0.1)
H100 = Hardware("gpu", "H100", 1, 80.0, 3350.0, 989.0)
SMOL = replace(lookup("SmolLM2-135M"), dtype="float32")


def profile_dict(hw: Hardware = CPU, arch=SMOL, fit: dict | None = None, **kw: object) -> dict:
    """A synthetic profile: points on t = 2ms + 0.1ms/prefill token + 1ms/decode seq +
    1us/context token."""
    pts = []
    for pre, dec, ctx in [(16, 0, 16), (256, 0, 256), (0, 1, 128), (0, 8, 2048), (0, 32, 4096),
                          (128, 4, 1024)]:  # fmt: skip
        pts.append({"num_prefill_tokens": pre, "num_decode_seqs": dec,
                    "total_context_tokens": ctx,
                    "seconds": 2e-3 + 1e-4 * pre + 1e-3 * dec + 1e-6 * ctx})  # fmt: skip
    d = {
        "schema": SCHEMA,
        "hardware": {"kind": hw.kind, "name": hw.name, "count": hw.count},
        "model": {"name": arch.name, "arch_hash": arch.arch_hash, "dtype": arch.dtype},
        "engine": {"block_size": 16, "max_num_seqs": 16},
        "points": pts,
        "created": "2026-11-26T00:00:00Z",
        "source": "test",
    }
    if fit is not None:
        d["fit"] = fit
    d.update(kw)
    return d


def write(tmp_path: Path, name: str, data: dict) -> str:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


# --- format -----------------------------------------------------------------------------------


def test_round_trip_and_fit(tmp_path: Path) -> None:
    prof = validate(profile_dict())
    assert prof.fit == pytest.approx(
        {"intercept": 2e-3, "per_prefill_token": 1e-4, "per_decode_seq": 1e-3,
         "per_context_token": 1e-6, "per_attn_pair": 0.0}, rel=1e-6, abs=1e-12)  # fmt: skip
    path = tmp_path / "p.json"
    save(prof, path)
    again = load(path)
    assert again.to_dict() == prof.to_dict()
    assert again.path == str(path)
    m = ProfileModel.of(again)
    assert m.step_time(100, 4, 1000) == pytest.approx(2e-3 + 1e-2 + 4e-3 + 1e-3)
    assert m.source == f"profile:{path}"
    assert m.cache_key == ProfileModel.of(prof).cache_key


def test_fit_recovers_the_quadratic_prefill_attention() -> None:
    """A prompt of P tokens attends over P^2/2 (query, key) pairs: a long prompt costs more than
    two halves of it, and the fit finds that term (the simulator passes the same pairs)."""
    pts = [{"num_prefill_tokens": p, "num_decode_seqs": d, "total_context_tokens": c,
            "seconds": 2e-3 + 1e-5 * p + 1e-4 * d + 1e-7 * c + 1e-7 * p * p / 2}
           for p, d, c in [(16, 0, 16), (64, 0, 64), (256, 0, 256), (512, 0, 512), (0, 1, 64),
                           (0, 8, 512), (0, 16, 4096), (64, 4, 1092)]]  # fmt: skip
    fit = fit_points(pts)
    assert fit["per_attn_pair"] == pytest.approx(1e-7, rel=1e-6)
    assert fit["per_prefill_token"] == pytest.approx(1e-5, rel=1e-6)
    m = ProfileModel.of(validate(profile_dict(points=pts)))
    assert m.step_time(512, 0, 512, 512 * 256) == pytest.approx(pts[3]["seconds"])
    assert m.fast_step()(512, 0, 512, 512 * 256) == pytest.approx(pts[3]["seconds"])
    # a point may record its own pairs (a chunk after cached tokens attends to them too)
    pts[3]["prefill_attn_pairs"] = 512 * 256
    assert fit_points(pts) == pytest.approx(fit)


def test_fit_written_before_the_attention_term_reads_as_zero() -> None:
    old = {"intercept": 0.01, "per_prefill_token": 1e-4, "per_decode_seq": 1e-3,
           "per_context_token": 1e-6}  # fmt: skip
    prof = validate(profile_dict(fit=old))
    assert prof.fit == {**old, "per_attn_pair": 0.0}
    assert ProfileModel.of(prof).step_time(100, 0, 100, 5000) == pytest.approx(0.01 + 1e-2 + 1e-4)


def test_fit_drops_negative_coefficients() -> None:
    pts = [{"num_prefill_tokens": p, "num_decode_seqs": d, "total_context_tokens": c,
            "seconds": 0.01 + 1e-4 * p - 1e-7 * c} for p, d, c in
           [(10, 0, 10), (100, 0, 100), (0, 4, 50), (0, 8, 400), (50, 2, 600)]]  # fmt: skip
    fit = fit_points(pts)
    assert all(v >= 0 for v in fit.values())


@pytest.mark.parametrize(
    "change, words",
    [
        ({"schema": "v0"}, "schema must be"),
        ({"hardware": {"kind": "tpu", "name": "v5e", "count": 1}}, "hardware needs kind"),
        ({"hardware": {"kind": "cpu", "name": "x", "count": 0}}, "hardware.count"),
        ({"model": {}}, "model needs name"),
        ({"points": []}, "at least 4"),
        ({"fit": {"intercept": 1.0}}, "fit must have"),
    ],
)
def test_bad_profile_names_the_field(change: dict, words: str) -> None:
    with pytest.raises(ProfileError, match=words):
        validate(profile_dict(**change))


def test_bad_point_names_index() -> None:
    d = profile_dict()
    d["points"][2]["seconds"] = 0
    with pytest.raises(ProfileError, match=r"points\[2\]\.seconds"):
        validate(d)


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ProfileError, match="cannot read profile JSON"):
        load(tmp_path / "bad.json")


# --- matching ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYBROKER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SKYBROKER_PERF_CACHE", "0")
    monkeypatch.setattr("skybroker.perf.profile.BUNDLED_DIR", tmp_path / "no-bundled")


def test_matching_profile_is_used(tmp_path: Path) -> None:
    path = write(tmp_path, "cpu.json", profile_dict())
    notes: list[str] = []
    m = find_profile(SMOL, CPU, [path], notes)
    assert m is not None and m.source == f"profile:{path}" and notes == []


def test_wrong_model_not_used(tmp_path: Path) -> None:
    other = replace(lookup("SmolLM2-360M"), dtype="float32")
    path = write(tmp_path, "other.json", profile_dict(arch=other))
    notes: list[str] = []
    assert find_profile(SMOL, CPU, [path], notes) is None
    assert len(notes) == 1
    assert "not used" in notes[0] and "SmolLM2-360M" in notes[0] and SMOL.arch_hash in notes[0]


def test_wrong_dtype_is_another_model(tmp_path: Path) -> None:
    path = write(tmp_path, "bf16.json", profile_dict(arch=replace(SMOL, dtype="bfloat16")))
    notes: list[str] = []
    assert find_profile(SMOL, CPU, [path], notes) is None
    assert "bfloat16" in notes[0] and "float32" in notes[0]


@pytest.mark.parametrize(
    "hw", [replace(CPU, name="Other CPU"), replace(CPU, count=4), H100], ids=str
)
def test_wrong_hardware_not_used(tmp_path: Path, hw: Hardware) -> None:
    path = write(tmp_path, "cpu.json", profile_dict())
    notes: list[str] = []
    assert find_profile(SMOL, hw, [path], notes) is None
    assert notes == [f"profile {path} not used for {hw.tag}: measured on "
                     f"cpu:Test CPU 9000:2, not on this replica's {hw.tag}"]  # fmt: skip


def test_found_profiles_note_only_near_misses(tmp_path: Path) -> None:
    home = tmp_path / "home" / "profiles"
    home.mkdir(parents=True)
    write(home, "a-h100.json", profile_dict(hw=H100))  # other device kind: silent
    write(home, "b-cpu4.json", profile_dict(hw=replace(CPU, count=4)))  # near miss: noted
    write(home, "c-cpu.json", profile_dict())  # the match
    notes: list[str] = []
    m = find_profile(SMOL, CPU, None, notes)
    assert m is not None and m.source.endswith("c-cpu.json")
    assert len(notes) == 1 and "b-cpu4.json" in notes[0] and "cpu:Test CPU 9000:4" in notes[0]


def test_bundled_profiles_are_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    write(bundled, "smol.json", profile_dict(hw=H100, arch=lookup("SmolLM2-135M")))
    monkeypatch.setattr("skybroker.perf.profile.BUNDLED_DIR", bundled)
    m = find_profile(lookup("SmolLM2-135M"), H100)
    assert m is not None and m.source.endswith("smol.json")


def test_shipped_profiles_are_valid() -> None:
    shipped = Path(__file__).resolve().parents[1] / "catalogs" / "profiles"
    for f in sorted(shipped.glob("*.json")):
        prof = load(f)
        assert prof.hardware["kind"] in ("cpu", "gpu") and prof.model.get("arch_hash"), f


# --- the planner uses it -------------------------------------------------------------------


def _local_spec(profiles: list[str]):
    from skybroker.spec import load_spec

    return load_spec(
        "name: t\ninfra: local\nmodel: {name: SmolLM2-135M}\n"
        "workload: {rate: 0.5, input_tokens: 64, output_tokens: 16}\n"
        "slo: {ttft_ms: 2000, tpot_ms: 500, percentile: 90}\n"
        f"engine: {{max_num_seqs: 8, max_num_batched_tokens: 512, kv_cache_gib: 1, "
        f"profiles: {json.dumps(profiles)}}}\n"
    )


def test_local_plan_uses_matching_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skybroker import plan as plan_mod
    from skybroker import plan_perf, plan_problem

    monkeypatch.setattr(plan_perf, "cpu_hardware", lambda: CPU)
    monkeypatch.setattr(plan_problem, "cpu_hardware", lambda: CPU)
    good = write(tmp_path, "cpu.json", profile_dict())
    bad = write(tmp_path, "h100.json", profile_dict(hw=H100))
    plan = plan_mod.make_plan(_local_spec([bad, good]), baselines=False)
    (p,) = plan.placements
    assert p.perf_source == f"profile:{good}"
    assert plan.perf_notes == [f"profile {bad} not used for {CPU.tag}: measured on gpu:H100x1, "
                               f"not on this replica's {CPU.tag}"]  # fmt: skip
    assert plan.to_dict()["placements"][0]["perf_source"] == f"profile:{good}"
    # the predicted TPOT comes from the profile: one decode step of ~1 sequence at least
    assert p.tpot_s >= 2e-3 + 1e-3
    plan2 = plan_mod.make_plan(_local_spec([bad]), baselines=False)
    assert plan2.placements[0].perf_source == "roofline" and plan2.perf_notes


# --- simulation on a synthetic profile: hand-computed queueing ------------------------------


def constant_profile(step_s: float, per_prefill_token: float = 0.0) -> ProfileModel:
    fit = {"intercept": step_s, "per_prefill_token": per_prefill_token, "per_decode_seq": 0.0,
           "per_context_token": 0.0}  # fmt: skip
    return ProfileModel.of(validate(profile_dict(fit=fit)))


BIG = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096, num_kv_blocks=10_000)


def run(model: ProfileModel, cfg: SchedulerConfig, arrivals: list[float], ins: list[int],
        outs: list[int]):  # fmt: skip
    return simulate(model, cfg, np.array(arrivals, float), np.array(ins), np.array(outs))


def test_one_request_alone() -> None:
    # prefill step emits the first token (T), then 4 decode steps of T each
    r = run(constant_profile(0.25), BIG, [1.0], [10], [5])
    assert r.ttft[0] == pytest.approx(0.25) and r.tpot[0] == pytest.approx(0.25)
    assert r.finish[0] == pytest.approx(1.0 + 5 * 0.25) and r.num_steps == 5


def test_spaced_arrivals_never_queue() -> None:
    # service 6 x 0.125 = 0.75 s < gap 1 s: each request sees an idle replica
    r = run(constant_profile(0.125), BIG, [0, 1, 2, 3], [8] * 4, [6] * 4)
    assert r.ttft == pytest.approx([0.125] * 4) and r.tpot == pytest.approx([0.125] * 4)
    assert r.finish == pytest.approx([0.75, 1.75, 2.75, 3.75])


def test_prefill_time_from_profile_tokens() -> None:
    # t = 0.01 + 0.001 * prefill tokens: 100-token prompt -> TTFT 0.11, decodes 0.01
    r = run(constant_profile(0.01, 1e-3), BIG, [0.0], [100], [3])
    assert r.ttft[0] == pytest.approx(0.11) and r.tpot[0] == pytest.approx(0.01)


def test_chunked_prefill() -> None:
    # 100 prompt tokens with a 40-token budget: 3 chunks (40, 40, 20) before the first token
    cfg = replace(BIG, max_num_batched_tokens=40)
    r = run(constant_profile(0.5), cfg, [0.0], [100], [2])
    assert r.ttft[0] == pytest.approx(1.5) and r.finish[0] == pytest.approx(2.0)


def test_fcfs_queue_with_one_slot_over_capacity() -> None:
    # one sequence at a time, service S = 4 steps x 0.25 = 1 s, arrivals every 0.5 s:
    # request k starts at k*S, so waits k*(S - 0.5) and TTFT_k = k*0.5 + 0.25; TPOT stays T
    cfg = replace(BIG, max_num_seqs=1)
    n = 6
    r = run(constant_profile(0.25), cfg, [0.5 * k for k in range(n)], [4] * n, [4] * n)
    assert r.ttft == pytest.approx([0.5 * k + 0.25 for k in range(n)])
    assert r.tpot == pytest.approx([0.25] * n)
    assert r.finish == pytest.approx([1.0 * (k + 1) for k in range(n)])


def test_continuous_batching_joins_running_batch() -> None:
    # A arrives at 0 (prefill step 0-1), decodes 1-2, 2-3; B arrives at 1.5, waits for the step
    # in flight, is prefilled together with A's decode in step 2-3 -> TTFT 1.5, then decodes
    # with A. Constant step time 1 s: A's 4 tokens at 1,2,3,4; B's 3 tokens at 3,4,5.
    r = run(constant_profile(1.0), BIG, [0.0, 1.5], [8, 8], [4, 3])
    assert r.ttft == pytest.approx([1.0, 1.5])
    assert r.finish == pytest.approx([4.0, 5.0])
    assert r.tpot == pytest.approx([1.0, 1.0])


def test_kv_blocks_limit_admission() -> None:
    # 2 blocks of 16 tokens: a 20-token prompt + 8 outputs needs both blocks, so the second
    # request waits until the first finishes (at 8 steps) and then runs alone.
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, num_kv_blocks=2,
                          block_size=16)  # fmt: skip
    r = run(constant_profile(0.5), cfg, [0.0, 0.0], [20, 20], [8, 8])
    assert r.ttft[0] == pytest.approx(0.5)
    assert r.finish[0] == pytest.approx(4.0)
    assert r.ttft[1] == pytest.approx(4.5) and r.finish[1] == pytest.approx(8.0)


def test_server_overhead_adds_to_ttft() -> None:
    # idle: the request reaches the engine 0.1 s late (TTFT 0.1 + 0.25); a request arriving
    # while the engine steps gets its first token 0.3 s after the idle figure
    fit = {"intercept": 0.25, "per_prefill_token": 0.0, "per_decode_seq": 0.0,
           "per_context_token": 0.0}  # fmt: skip
    serving = {"request_overhead_s": 0.1, "busy_request_overhead_s": 0.4, "step_overhead_s": 0.0,
               "per_seq_overhead_s": 0.0}  # fmt: skip
    model = ProfileModel.of(validate(profile_dict(fit=fit, serving=serving)))
    r = run(model, BIG, [0.0, 0.3], [8, 8], [8, 2])
    assert r.ttft[0] == pytest.approx(0.35)  # arrives idle: enters at 0.1, prefilled by 0.35
    # enters at 0.4 during A's step 0.35-0.6, prefilled in 0.6-0.85: 0.85 - 0.3 + 0.3
    assert r.ttft[1] == pytest.approx(0.85)
    assert r.tpot[0] == pytest.approx(0.25)  # TPOT unchanged
    # a busy figure below the idle one (probe noise) never makes a busy arrival faster
    low = ProfileModel.of(validate(profile_dict(fit=fit, serving=dict(
        serving, busy_request_overhead_s=0.0))))  # fmt: skip
    r = run(low, BIG, [0.0, 0.3], [8, 8], [8, 2])
    assert r.ttft[1] == pytest.approx(0.85 - 0.3)  # the idle path: enters 0.4, done 0.85
    steps = dict(serving, step_overhead_s=0.05, per_seq_overhead_s=0.01)
    slow = ProfileModel.of(validate(profile_dict(fit=fit, serving=steps)))
    assert slow.step_time(0, 4, 100) == pytest.approx(0.25 + 0.05 + 4 * 0.01)
    with pytest.raises(ProfileError, match="serving must have"):
        validate(profile_dict(fit=fit, serving={"request_overhead_s": 0.1}))
