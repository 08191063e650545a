"""Does the planner predict what the engine really does? Simulator vs a real engine server.

For a measured profile (`skybroker profile` / `python -m engine.profile`, with its "serving"
section) and its model: a real `python -m engine.serve` (the profiled settings) gets the
serving benchmark's workload (benchmarks/serve.py: long-tailed lengths, streamed
/v1/completions, Poisson arrivals, fixed seed) at three request rates: light, near and over
capacity (0.3, 0.8, 1.5 x the simulator's saturated throughput on this workload). The planner's
simulator (`skybroker.perf.simulator` on the profile, step noise seeded) replays the same
requests at the times the client really sent them. Prints predicted, measured and the error of
TTFT and TPOT at p50 and p99 (medians over --runs), and whether the SLO verdict (met / missed)
agrees at each rate.

The capacity boundary is a real test: unless --slo-ttft-ms is given, the TTFT limit is derived
from the simulator (the geometric mean of its predicted p99 TTFT at the near and over rates),
so the simulator calls the near rate feasible and the over rate infeasible with the same
relative margin, and its capacity on this workload falls between them; the measured verdicts at
both rates must agree. A measurement off from the prediction by more than that margin flips a
verdict.

With --measure-profile the profile is measured first in the same run (back to back, so
machine load affects both alike). On a quiet machine, after merging engine changes:

    OMP_NUM_THREADS=1 python benchmarks/validate_perf.py --measure-profile \
        --profile catalogs/profiles/tiny-llama-cpu.json          # ~8-10 min, rewrites it

    OMP_NUM_THREADS=1 python benchmarks/validate_perf.py \
        --profile catalogs/profiles/tiny-llama-cpu.json          # validation only

--model defaults to the random tiny Llama the shipped profile was measured on (built with
tests/fixtures_models.build_tiny_model into a temp dir; needs `transformers`). --device cuda
runs the profiler and the server on the GPU (give --model and, for a random-weight model with
the tests' small tokenizer, --vocab-size).

--dump FILE keeps every run (send times, measured times, the engine's step log); --replay FILE
predicts those runs again with --profile, no server (--serving-from-run K: a held-out test, the
profile's served steps and engine-loop gaps taken from recorded run K):

    python benchmarks/validate_perf.py --replay benchmarks/data/validate-h100-host-cpu.json.gz \
        --profile benchmarks/data/tiny-llama-h100-host-cpu.json --slo-ttft-ms 155 \
        --serving-from-run 0
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve as bench  # noqa: E402  (benchmarks/serve.py: workload, streamed request timing)

from skybroker.perf.capacity import SLOTarget, max_rate  # noqa: E402
from skybroker.perf.profile import EngineProfile, ProfileModel, load  # noqa: E402
from skybroker.perf.simulator import SchedulerConfig, simulate  # noqa: E402
from skybroker.perf.workload import RequestClass  # noqa: E402


def tiny_model() -> str:
    """The random tiny Llama of catalogs/profiles/tiny-llama-cpu.json (same seed, same shape)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_models import build_tiny_model

    d = Path(tempfile.gettempdir()) / "skybroker-validate-tiny-llama"
    if not (d / "config.json").is_file():
        build_tiny_model(d, "llama", max_position_embeddings=2048)
    return str(d)


async def run_load(url: str, items: list, rate: float,
                   seed: int) -> tuple[list, np.ndarray, float]:  # fmt: skip
    """benchmarks/serve.py's Poisson load (same seeded gaps), each request sent at its time on
    the schedule (not after a relative sleep: a client slowed by a busy machine would send at a
    lower rate than asked); returns the results, when each request was really sent (seconds
    from the start) and the start on the monotonic clock (the engine's step log's)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    tasks, sent = [], []
    t0, t0_mono = time.perf_counter(), time.monotonic()
    for item, at in zip(items, unit_schedule(len(items), seed) / rate, strict=True):
        await asyncio.sleep(max(t0 + at - time.perf_counter(), 0.0))
        sent.append(time.perf_counter() - t0)
        tasks.append(asyncio.create_task(bench._one((host, port), "profile", item)))
    return list(await asyncio.gather(*tasks)), np.array(sent), t0_mono


def step_ratios(steps: list[dict], model: ProfileModel) -> np.ndarray:
    """Each logged engine step's speed against the profile (`ProfileModel.speed_of`): its
    period over what the profile expects of a served step of its shape and kind; 1 is the
    speed of the profile's serving probe."""
    from engine.profile_serving import served_rows

    return model.speed_of(served_rows(steps))


def step_ratio_medians(steps: list[dict], model: ProfileModel) -> tuple[float, float]:
    """Median speed against the profile of the decode-only and of the prefill steps."""
    r = step_ratios(steps, model) if steps else np.ones(0)
    pre = np.array([s["num_prefill_tokens"] > 0 for s in steps], dtype=bool)
    return tuple(float(np.median(x)) if len(x) else float("nan") for x in (r[~pre], r[pre]))


def speed_trace(steps: list[dict], model: ProfileModel, t0: float,
                window_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The machine's speed while it served: per `window_s` window from t0, the median of
    the steps' speed against the profile (`step_ratios`) over the window's steps;
    a window with fewer than 3 steps takes the run's median."""
    if not steps:
        return np.zeros(1), np.ones(1)
    at = np.array([s["start"] - t0 for s in steps])
    ratio = step_ratios(steps, model)
    starts = np.arange(0.0, max(at.max(), 0.0) + window_s, window_s)
    which = np.clip(np.searchsorted(starts, at, side="right") - 1, 0, len(starts) - 1)
    overall = float(np.median(ratio))
    factors = np.array([float(np.median(r)) if len(r := ratio[which == i]) >= 3 else overall
                        for i in range(len(starts))])  # fmt: skip
    return starts, factors


def pcts(x: np.ndarray) -> tuple[float, float]:
    if not len(x):
        return float("nan"), float("nan")
    return float(np.percentile(x, 50)), float(np.percentile(x, 99))


def measured(results: list) -> tuple[np.ndarray, np.ndarray, int]:
    ok = [r for r in results if r.ok]
    ttft = np.array([r.ttft for r in ok])
    tpot = np.array([(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1])
    return ttft, tpot, len(results) - len(ok)


def fresh_prompts(items: list, vocab: int, seed: int, k: int) -> list:
    """The workload's requests with new random prompt ids (same lengths, same output lengths)
    for pass k: a prompt the server saw in an earlier pass would hit its prefix cache and skip
    most of its prefill, which the planner (no shared prefixes) does not predict."""
    rng = np.random.default_rng([seed, k])
    return [dataclasses.replace(i, prompt_token_ids=rng.integers(
        100, vocab - 100, len(i.prompt_token_ids)).tolist()) for i in items]  # fmt: skip


def cached_lens(run: dict, block_size: int) -> np.ndarray:
    """Prompt tokens a recorded run found in the server's prefix cache. Runs recorded with
    fresh prompts per pass found none; older dumps sent the same prompts in every pass, so
    every pass after the first (and the first's two warm-up requests) found all their whole
    blocks but the last token's (as engine.block_manager matches them)."""
    ins = np.array(run["input_lens"])
    warm = (ins - 1) // block_size * block_size
    if run.get("fresh_prompts"):
        return np.zeros_like(ins)
    if run.get("first_pass"):
        return np.where(np.arange(len(ins)) < 2, warm, 0)
    return warm


def read_dump(path: str) -> list[dict]:
    """The runs a --dump recorded (plain or gzipped JSON); the earliest is marked
    `first_pass` (dumps are in rate order, and the first rate's first run came first)."""
    raw = Path(path).read_bytes()
    runs = json.loads(gzip.decompress(raw) if path.endswith(".gz") else raw)["runs"]
    first = min(range(len(runs)), key=lambda i: (runs[i].get("t0", 0.0), i))
    runs[first]["first_pass"] = True
    return runs


def write_dump(path: str, profile: str, runs: list[dict]) -> None:
    """The recorded runs as JSON for --replay; gzipped when the name ends in .gz."""
    raw = (json.dumps({"profile": profile, "runs": runs}) + "\n").encode()
    Path(path).write_bytes(gzip.compress(raw) if path.endswith(".gz") else raw)


def unit_schedule(n: int, seed: int) -> np.ndarray:
    """When each request is due at rate 1: seeded exponential gaps (benchmarks/serve.py's
    `rng.exponential(1 / rate)` draws); at rate r the schedule is this one / r."""
    gaps = np.random.default_rng(seed).exponential(1.0, n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


def slo_met(ttft: np.ndarray, tpot: np.ndarray, slo: SLOTarget, failed: int = 0) -> bool:
    """The SLO verdict: every request served and both percentiles within their limits."""
    q = slo.percentile
    return bool(failed == 0 and len(ttft) and np.percentile(ttft, q) <= slo.ttft_s
                and (not len(tpot) or np.percentile(tpot, q) <= slo.tpot_s))  # fmt: skip


def boundary_ttft_slo(p_near: float, p_over: float, min_ratio: float = 1.5) -> float:
    """A TTFT limit the simulator puts between the near and the over rate: the geometric mean of
    its predicted TTFT percentiles there, so both verdicts have the same relative margin (and a
    measurement off by less than sqrt(p_over / p_near) agrees with both). ValueError when the
    two predictions are too close for the boundary to be a test."""
    if not p_over >= min_ratio * p_near > 0:
        raise ValueError(f"predicted TTFT at the over rate ({p_over * 1e3:.1f} ms) is not "
                         f">= {min_ratio:g}x the near rate's ({p_near * 1e3:.1f} ms): pick rates "
                         "further apart (--rates)")  # fmt: skip
    return math.sqrt(p_near * p_over)


def sim_capacity(predict: Callable[[float], tuple[np.ndarray, np.ndarray]], slo: SLOTarget,
                 lo: float, hi: float, rel_tol: float = 0.01) -> float:  # fmt: skip
    """The highest rate in [lo, hi] whose simulated TTFT/TPOT meet the SLO (bisection on
    log rate; `predict(rate)` gives the simulated per-request TTFT and TPOT)."""
    if not slo_met(*predict(lo), slo):
        return lo
    if slo_met(*predict(hi), slo):
        return hi
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if slo_met(*predict(mid), slo) else (lo, mid)
    return lo


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Pin every thread of `pid` and of its descendants to `cpus`."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)
        for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
            pin_tree(int(child), cpus)


def measure_profile(a: argparse.Namespace) -> None:
    cmd = [sys.executable, "-m", "engine.profile", "--model", a.model, "--out", a.profile,
           "--max-batch", str(a.max_num_seqs), "--max-context", "1024", "--repeats",
           str(a.repeats), "--kv-cache-gib", str(a.kv_cache_gib),
           "--max-num-batched-tokens", str(a.max_num_batched_tokens), "--device", a.device]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    # Pinned, the profiler gets both CPUs: its serving probe's HTTP process then runs beside
    # the probe's engine, as the validated server's does (on one CPU with it, the server's
    # per-token work would count as engine time the served engine never spends).
    cpus = set(a.pin) if a.pin else None
    subprocess.run(cmd, check=True, cwd=ROOT,
                   preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if a.pin else None)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF dir or .gguf (default: the tiny Llama, built)")
    p.add_argument("--profile", default=str(ROOT / "catalogs/profiles/tiny-llama-cpu.json"))
    p.add_argument("--measure-profile", action="store_true",
                   help="measure --profile first (python -m engine.profile), then validate")  # fmt: skip
    p.add_argument("--repeats", type=int, default=7, help="profile: steps per point")
    p.add_argument("--num-prompts", type=int, default=200, help="requests per rate")
    p.add_argument("--runs", type=int, default=3, help="measurements per rate (medians printed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-input-len", type=int, default=384)
    p.add_argument("--max-output-len", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="prompt token ids are drawn below this (default: the model's vocabulary)")  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=float, default=0.25, help="KV cache size (CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the profiler and the server run the engine")  # fmt: skip
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="TTFT limit (default: derived from the simulator so that its capacity "
                   "falls between the near and the over rate)")  # fmt: skip
    p.add_argument("--slo-tpot-ms", type=float, default=150.0)
    p.add_argument("--slo-percentile", type=float, default=99.0)
    p.add_argument("--pin", type=lambda v: [int(c) for c in v.split(",")], default=None,
                   metavar="CLIENT,ENGINE", help="pin this client and the HTTP process to CPU "
                   "CLIENT, the engine process to CPU ENGINE, e.g. 0,1 (the profiler gets both): "
                   "the load generator then takes no CPU from the engine")  # fmt: skip
    p.add_argument("--dump", help="write per-request sent/measured/predicted times (JSON) here")
    p.add_argument("--replay", metavar="DUMP", help="predict a --dump's recorded runs again with "
                   "--profile instead of measuring (no server; a .gz dump is read too)")  # fmt: skip
    p.add_argument("--serving-from-run", type=int, default=None, metavar="K",
                   help="with --replay: take the profile's engine-loop overhead and served steps "
                   "from recorded run K (0-based) and predict the other runs (a held-out test of "
                   "profiling under serving load)")  # fmt: skip
    p.add_argument("--rates", default="", help="comma-separated light,near,over req/s (default: "
                   "0.3, 0.8, 1.5 x the simulator's saturated throughput; with --slo-ttft-ms, "
                   "x its capacity at that SLO)")  # fmt: skip
    a = p.parse_args()
    recorded = read_dump(a.replay) if a.replay else None
    if recorded:  # the recorded runs' rates and workload; nothing is measured
        a.rates = ",".join(repr(r) for r in sorted({r["rate"] for r in recorded}))
        a.measure_profile = False
    a.model = a.model or (None if recorded else tiny_model())
    if a.pin:
        os.sched_setaffinity(0, {a.pin[0]})
    t_start = time.perf_counter()
    if a.measure_profile:
        measure_profile(a)

    if recorded:
        items = recorded[0]["input_lens"]
        ins, outs = np.array(recorded[0]["input_lens"]), np.array(recorded[0]["output_lens"])
    else:
        from engine.loader import load_model_config

        vocab = a.vocab_size or load_model_config(a.model).vocab_size
        items = bench.make_workload(a.num_prompts, vocab, a.seed, a.max_input_len,
                                    a.max_output_len)  # fmt: skip
        ins = np.array([len(i.prompt_token_ids) for i in items])
        outs = np.array([i.output_len for i in items])
    prof = load(a.profile)
    if recorded and a.serving_from_run is not None:
        prof, recorded = served_from(prof, recorded, a.serving_from_run)
    model = ProfileModel.of(prof)
    blocks = int(prof.engine.get("num_kv_blocks") or 10_000)
    cfg = SchedulerConfig(a.max_num_seqs, a.max_num_batched_tokens, blocks, 16)
    unit = unit_schedule(len(items), a.seed)

    def predict(rate: float) -> tuple[np.ndarray, np.ndarray]:
        sim = simulate(model, cfg, unit / rate, ins, outs, seed=a.seed)
        return sim.ttft, sim.tpot[outs > 1]

    q = a.slo_percentile
    if a.slo_ttft_ms is None:  # the boundary as a test: SLO between the near and over rates
        sat = len(items) / simulate(model, cfg, 0 * unit, ins, outs, seed=a.seed).finish.max()
        rates = [float(r) for r in a.rates.split(",")] if a.rates else [0.3 * sat, 0.8 * sat,
                                                                          1.5 * sat]  # fmt: skip
        near, over = (np.percentile(predict(r)[0], q) for r in rates[1:3])
        slo = SLOTarget(boundary_ttft_slo(near, over), a.slo_tpot_ms / 1000, q)
        why = (f"saturated throughput {sat:.2f} req/s; TTFT limit = geometric mean of the "
               f"predicted p{q:g} at the near and over rates ({near * 1e3:.0f}, "
               f"{over * 1e3:.0f} ms)")  # fmt: skip
    else:
        slo = SLOTarget(a.slo_ttft_ms / 1000, a.slo_tpot_ms / 1000, q)
        cls = RequestClass("workload", 1.0, tuple(map(int, ins)), tuple(map(int, outs)))
        cap = max_rate(model, cfg, cls, slo, num_requests=a.num_prompts, seed=a.seed).rate
        rates = [float(r) for r in a.rates.split(",")] if a.rates else [0.3 * cap, 0.8 * cap,
                                                                          1.5 * cap]  # fmt: skip
        why = f"planner's max_rate at this SLO {cap:.2f} req/s"
    # met at one rate and missed at the next: the capacity is between them (with step noise
    # the simulated verdict need not be monotone in the rate, so bracket the first crossing)
    met = [slo_met(*predict(r), slo) for r in rates]
    lo, hi = min(rates), max(rates)
    for i in range(len(rates) - 1):
        if met[i] and not met[i + 1]:
            lo, hi = rates[i], rates[i + 1]
            break
    cap = sim_capacity(predict, slo, lo, hi)
    sv = prof.serving
    noise = "not measured"
    if (sf := model.served_factors) is not None:  # the factors the simulator draws
        buckets = ", ".join(f"{b}: {m:.2f}" for b, m in sorted(sf.by_batch.items()))
        res = "/".join(f"{x:.2f}" for x in np.percentile(sf.residual, [50, 90, 99]))
        noise = (f"served steps / model, median: prefill {sf.prefill:.2f}, decode "
                 f"{sf.decode:.2f} (per batch bucket {buckets or 'none'}); residual p50/p90/p99 "
                 f"{res}, read in blocks of consecutive steps")  # fmt: skip
    elif qs := model.step_noise:
        at = np.interp([0.5, 0.9, 0.99], np.linspace(0, 1, len(qs)), qs)
        noise = "grid p50/p90/p99 " + "/".join(f"{x:.2f}" for x in at)
    print(f"profile {a.profile} ({prof.hardware_tag}; serving overhead: request "
          f"{sv.get('request_overhead_s', 0) * 1e3:.1f} ms, step "
          f"{sv.get('step_overhead_s', 0) * 1e3:.2f} ms + "
          f"{sv.get('per_seq_overhead_s', 0) * 1e3:.2f} ms/seq; step noise "
          f"{noise})\n"
          f"{len(items)} requests per rate, mean {ins.mean():.0f} in / {outs.mean():.0f} out, "
          f"seed {a.seed}, {a.runs} runs; SLO p{q:g} TTFT <= {slo.ttft_s * 1e3:.0f} ms, TPOT <= "
          f"{slo.tpot_s * 1e3:.0f} ms ({why}); simulator capacity at this SLO on this workload: "
          f"{cap:.2f} req/s; rates {', '.join(f'{r:.2f}' for r in rates)}", flush=True)  # fmt: skip

    if recorded:
        runs = {r: [replayed(x, model, cfg, a.seed, cached_lens(x, 16))
                    for x in recorded if x["rate"] == r] for r in rates}  # fmt: skip
        report(runs, rates, slo, cap)
        print(f"total {time.perf_counter() - t_start:.0f} s (replayed {a.replay})")
        return
    from engine.metrics import read_step_log
    from engine.profile_serving import ServingProbe

    step_log = Path(tempfile.mkdtemp(prefix="validate-steps-")) / "steps.jsonl"
    step_log.touch()
    probe = ServingProbe(SimpleNamespace(model=a.model, max_num_batched_tokens=a.max_num_batched_tokens,
                                         kv_cache_gib=a.kv_cache_gib, device=a.device, threads=1),
                         a.max_num_seqs, step_log=str(step_log))  # fmt: skip
    url = f"http://127.0.0.1:{probe.port}"
    if a.pin:  # the engine runs in the server's child process
        for child in (
            Path(f"/proc/{probe.proc.pid}/task/{probe.proc.pid}/children").read_text().split()
        ):
            pin_tree(int(child), {a.pin[1]})
    runs: dict[float, list[dict]] = {r: [] for r in rates}
    try:
        asyncio.run(run_load(url, items[:2], float("inf"), a.seed))  # warm-up
        for run in range(a.runs):
            for j, rate in enumerate(rates):
                la = os.getloadavg()[0]
                offset = step_log.stat().st_size
                fresh = fresh_prompts(items, vocab, a.seed, run * len(rates) + j)
                res, sent, t0 = asyncio.run(run_load(url, fresh, rate, a.seed))
                ttft, tpot, failed = measured(res)
                sim = simulate(model, cfg, sent, ins, outs, seed=a.seed)
                steps, _ = read_step_log(step_log, offset)
                speed = speed_trace(steps, model, t0)
                adj = simulate(model, cfg, sent, ins, outs, seed=a.seed, speed=speed)
                runs[rate].append({"rate": rate, "load": la, "failed": failed, "t0": t0,
                                   "fresh_prompts": True,
                                   "sent": sent.tolist(), "input_lens": ins.tolist(),
                                   "output_lens": outs.tolist(),
                                   "ttft": [r.ttft if r.ok else None for r in res],
                                   "latency": [r.latency if r.ok else None for r in res],
                                   "errors": [r.error for r in res if not r.ok],
                                   "pred_ttft": sim.ttft.tolist(), "pred_tpot": sim.tpot.tolist(),
                                   "speed": speed[1].tolist(), "steps": steps,
                                   "step_ratio": step_ratio_medians(steps, model),
                                   "pred": (sim.ttft, sim.tpot[outs > 1]),
                                   "adj": (adj.ttft, adj.tpot[outs > 1]),
                                   "meas": (ttft, tpot)})  # fmt: skip
    finally:
        probe.close()
        shutil.rmtree(step_log.parent, ignore_errors=True)
    report(runs, rates, slo, cap)
    if a.dump:
        out = [{k: v for k, v in r.items() if k not in ("pred", "adj", "meas")}
               for rs in runs.values() for r in rs]  # fmt: skip
        write_dump(a.dump, a.profile, out)
    print(f"total {time.perf_counter() - t_start:.0f} s")


def served_from(prof: EngineProfile, recorded: list[dict],
                k: int) -> tuple[EngineProfile, list[dict]]:  # fmt: skip
    """The profile with its serving overheads per step and its served steps taken from run k's
    step log (as the profiler's serving probe takes them from its own), and the other runs."""
    from engine.profile_serving import loop_overhead, served_rows

    steps = recorded[k]["steps"]
    step_s, per_seq_s = loop_overhead(steps)
    served = served_rows(steps)
    serving = {**prof.serving, "step_overhead_s": step_s, "per_seq_overhead_s": per_seq_s}
    print(f"served steps and loop overhead from run {k} (rate {recorded[k]['rate']:.2f}): "
          f"{len(served)} steps, {step_s * 1e3:.3f} ms + {per_seq_s * 1e3:.3f} ms/seq per step")  # fmt: skip
    rest = recorded[:k] + recorded[k + 1 :]
    return dataclasses.replace(prof, serving=serving, serving_steps=served), rest


def replayed(run: dict, model: ProfileModel, cfg: SchedulerConfig,
             seed: int, cached: np.ndarray) -> dict:  # fmt: skip
    """A recorded run with the predictions of `model` in place of the recorded ones (the
    simulator told which prompt tokens the server's prefix cache held: `cached`)."""
    sent, ins, outs = (np.array(run[k]) for k in ("sent", "input_lens", "output_lens"))
    ok = [i for i, t in enumerate(run["ttft"]) if t is not None]
    ttft = np.array([run["ttft"][i] for i in ok])
    lat = np.array([run["latency"][i] for i in ok])
    many = outs[ok] > 1
    tpot = (lat[many] - ttft[many]) / (outs[ok][many] - 1)
    sim = simulate(model, cfg, sent, ins, outs, seed=seed, cached_lens=cached)
    steps = run.get("steps") or []
    t0 = run.get("t0", steps[0]["start"] - sent[0] if steps else 0.0)
    speed = speed_trace(steps, model, t0)
    adj = simulate(model, cfg, sent, ins, outs, seed=seed, speed=speed, cached_lens=cached)
    return {**run, "speed": speed[1].tolist(), "step_ratio": step_ratio_medians(steps, model),
            "pred": (sim.ttft, sim.tpot[outs > 1]), "adj": (adj.ttft, adj.tpot[outs > 1]),
            "meas": (ttft, tpot)}  # fmt: skip


def report(runs: dict[float, list[dict]], rates: list[float], slo: SLOTarget, cap: float) -> None:
    """The prediction-vs-measurement table (medians over runs) and the SLO verdicts: the
    profile's prediction as the planner makes it, and the same with the machine's speed during
    the run against the serving probe's, from the engine's own steps (`x speed`: the drift of a
    shared machine between the profile and the run taken out; a diagnostic)."""
    print(f"\n{'rate':>6} {'metric':>6} {'pct':>4} {'profile':>9} {'x speed':>9} {'measured':>9}"
          f" {'error':>6} {'x speed':>7}   (median of {len(runs[rates[0]])} runs)")  # fmt: skip
    errors: dict[str, dict[str, list[float]]] = {k: {"p50": [], "p99": []} for k in ("pred", "adj")}
    verdicts: dict[str, list[bool]] = {"pred": [], "adj": []}
    for rate in rates:
        rs = runs[rate]
        for m, name in enumerate(("TTFT", "TPOT")):
            for i, pct in enumerate(("p50", "p99")):
                v = {k: float(np.median([pcts(r[k][m])[i] for r in rs]))
                     for k in ("pred", "adj", "meas")}  # fmt: skip
                err = {k: (v[k] - v["meas"]) / v["meas"] for k in ("pred", "adj")}
                for k in err:
                    if rate < cap:
                        errors[k][pct].append(abs(err[k]))
                print(f"{rate:6.2f} {name:>6} {pct:>4} {v['pred'] * 1e3:7.1f}ms "
                      f"{v['adj'] * 1e3:7.1f}ms {v['meas'] * 1e3:7.1f}ms {err['pred']:+6.0%} "
                      f"{err['adj']:+7.0%}")  # fmt: skip
        meas = [slo_met(*r["meas"], slo, r["failed"]) for r in rs]
        tally = []
        for k in ("pred", "adj"):
            pred = [slo_met(*r[k], slo) for r in rs]
            verdicts[k].append(majority(pred) == majority(meas))
            tally.append(f"{_tally(pred)} ({'agree' if verdicts[k][-1] else 'DISAGREE'})")
        side = "feasible" if rate <= cap else "infeasible"
        sent = ", ".join(f"{(len(r['sent']) - 1) / r['sent'][-1]:.2f}" for r in rs)
        loads = ", ".join(f"{r['load']:.1f}" for r in rs)
        ratios = "; ".join("/".join(f"{x:.2f}" for x in r["step_ratio"]) for r in rs)
        speed = "; ".join("/".join(f"{q:.2f}" for q in np.percentile(r["speed"], [10, 50, 90]))
                          for r in rs)  # fmt: skip
        print(f"{rate:6.2f}  {side}: SLO measured {_tally(meas)}; predicted {tally[0]}, x speed "
              f"{tally[1]}; {sum(r['failed'] for r in rs)} failed; sent at {sent} req/s; load "
              f"{loads}; speed p10/50/90 per 1-s window "
              f"{speed}; engine speed vs the probe's, median decode/prefill {ratios}")  # fmt: skip
    steady_errors(runs, rates, cap)
    for k, what in (("pred", "profile"), ("adj", "profile x measured speed")):
        worst = {p: max(v, default=float("nan")) for p, v in errors[k].items()}
        print(f"{what}: below capacity ({cap:.2f} req/s) worst |error| p50 {worst['p50']:.0%} "
              f"(goal 10%), p99 {worst['p99']:.0%} (goal 20%); SLO verdicts agree at "
              f"{sum(verdicts[k])} of {len(verdicts[k])} rates")  # fmt: skip


def steady_errors(runs: dict[float, list[dict]], rates: list[float], cap: float,
                  tol: float = 0.15) -> None:  # fmt: skip
    """The profile's errors over only the runs whose engine decode steps ran at the serving
    probe's speed (median `step_ratios` within `tol` of 1): on a machine whose speed moves
    between the profile and the run, what is left is the model's error."""
    worst = {"p50": 0.0, "p99": 0.0}
    kept = []
    for rate in (r for r in rates if r < cap):
        rs = [r for r in runs[rate] if abs(r["step_ratio"][0] - 1) <= tol]
        kept.append(f"{rate:.2f}: {len(rs)} of {len(runs[rate])}")
        for m in range(2):
            for i, pct in enumerate(("p50", "p99")):
                if rs:
                    pv = float(np.median([pcts(r["pred"][m])[i] for r in rs]))
                    mv = float(np.median([pcts(r["meas"][m])[i] for r in rs]))
                    worst[pct] = max(worst[pct], abs(pv - mv) / mv)
    print(f"runs at the probe's speed (decode speed within {tol:.0%} of 1), per rate "
          f"below capacity: {'; '.join(kept)}; worst |error| over them p50 {worst['p50']:.0%}, "
          f"p99 {worst['p99']:.0%}")  # fmt: skip


def majority(met: list[bool]) -> bool:
    """The verdict of most runs (a tie counts as missed)."""
    return sum(met) * 2 > len(met)


def _tally(met: list[bool]) -> str:
    return "/".join("met" if m else "missed" for m in met)


if __name__ == "__main__":
    main()
