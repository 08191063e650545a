"""Does the planner predict what the engine really does? Simulator vs a real engine server.

For a measured profile (`skybroker profile` / `python -m engine.profile`, with its "serving"
section) and its model: a real `python -m engine.serve` (the profiled settings) gets the
serving benchmark's workload (benchmarks/serve.py: long-tailed lengths, streamed
/v1/completions, Poisson arrivals, fixed seed) at three request rates (light, near capacity,
over capacity; capacity = the simulator's highest rate meeting the SLO); then the planner's
simulator (`skybroker.perf.simulator` on the profile) replays the same requests at the times
the client really sent them. Prints predicted, measured and the error of TTFT and TPOT at p50
and p99, and whether the SLO verdict (met / missed) agrees at each rate.

With --measure-profile the profile is measured first in the same run (back to back, so
machine load affects both alike). On a quiet machine, after merging engine changes:

    OMP_NUM_THREADS=1 python benchmarks/validate_perf.py --measure-profile \
        --profile catalogs/profiles/tiny-llama-cpu.json          # ~5-8 min, rewrites it

    OMP_NUM_THREADS=1 python benchmarks/validate_perf.py \
        --profile catalogs/profiles/tiny-llama-cpu.json          # validation only

--model defaults to the random tiny Llama the shipped profile was measured on (built with
tests/fixtures_models.build_tiny_model into a temp dir; needs `transformers`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve as bench  # noqa: E402  (benchmarks/serve.py: workload, streamed request timing)

from skybroker.perf.capacity import SLOTarget, max_rate  # noqa: E402
from skybroker.perf.profile import ProfileModel, load  # noqa: E402
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


async def run_load(url: str, items: list, rate: float, seed: int) -> tuple[list, np.ndarray]:
    """benchmarks/serve.py's Poisson load, also recording when each request was sent."""
    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        tasks, sent = [], []
        t0 = time.perf_counter()
        for item in items:
            sent.append(time.perf_counter() - t0)
            tasks.append(asyncio.create_task(bench._one(client, f"{url}/v1/completions",
                                                        "profile", item)))  # fmt: skip
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))
        return list(await asyncio.gather(*tasks)), np.array(sent)


def pcts(x: np.ndarray) -> tuple[float, float]:
    if not len(x):
        return float("nan"), float("nan")
    return float(np.percentile(x, 50)), float(np.percentile(x, 99))


def measured(results: list) -> tuple[np.ndarray, np.ndarray, int]:
    ok = [r for r in results if r.ok]
    ttft = np.array([r.ttft for r in ok])
    tpot = np.array([(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1])
    return ttft, tpot, len(results) - len(ok)


def measure_profile(a: argparse.Namespace) -> None:
    cmd = [sys.executable, "-m", "engine.profile", "--model", a.model, "--out", a.profile,
           "--max-batch", str(a.max_num_seqs), "--max-context", "1024", "--repeats",
           str(a.repeats), "--kv-cache-gib", str(a.kv_cache_gib),
           "--max-num-batched-tokens", str(a.max_num_batched_tokens)]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF dir or .gguf (default: the tiny Llama, built)")
    p.add_argument("--profile", default=str(ROOT / "catalogs/profiles/tiny-llama-cpu.json"))
    p.add_argument("--measure-profile", action="store_true",
                   help="measure --profile first (python -m engine.profile), then validate")  # fmt: skip
    p.add_argument("--repeats", type=int, default=7, help="profile: steps per point")
    p.add_argument("--num-prompts", type=int, default=80, help="requests per rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-input-len", type=int, default=384)
    p.add_argument("--max-output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=float, default=0.25)
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=150.0)
    p.add_argument("--slo-percentile", type=float, default=99.0)
    p.add_argument("--rates", default="", help="comma-separated req/s (default: 0.3, 0.8, 1.5 "
                   "x the simulator's capacity)")  # fmt: skip
    a = p.parse_args()
    a.model = a.model or tiny_model()
    t_start = time.perf_counter()
    if a.measure_profile:
        measure_profile(a)

    from engine.loader import load_model_config
    from engine.profile import ServingProbe

    vocab = load_model_config(a.model).vocab_size
    items = bench.make_workload(a.num_prompts, vocab, a.seed, a.max_input_len, a.max_output_len)
    ins = np.array([len(i.prompt_token_ids) for i in items])
    outs = np.array([i.output_len for i in items])
    prof = load(a.profile)
    model = ProfileModel.of(prof)
    blocks = int(prof.engine.get("num_kv_blocks") or 10_000)
    cfg = SchedulerConfig(a.max_num_seqs, a.max_num_batched_tokens, blocks, 16)
    slo = SLOTarget(a.slo_ttft_ms / 1000, a.slo_tpot_ms / 1000, a.slo_percentile)
    cls = RequestClass("workload", 1.0, tuple(map(int, ins)), tuple(map(int, outs)))
    cap = max_rate(model, cfg, cls, slo, num_requests=a.num_prompts, seed=a.seed).rate
    rates = [float(r) for r in a.rates.split(",")] if a.rates else [0.3 * cap, 0.8 * cap, 1.5 * cap]
    sv = prof.serving
    print(f"profile {a.profile} ({prof.hardware_tag}; serving overhead: request "
          f"{sv.get('request_overhead_s', 0) * 1e3:.1f} ms, step "
          f"{sv.get('step_overhead_s', 0) * 1e3:.2f} ms + "
          f"{sv.get('per_seq_overhead_s', 0) * 1e3:.2f} ms/seq)\n{len(items)} requests per rate, "
          f"mean {ins.mean():.0f} in / {outs.mean():.0f} out, seed {a.seed}; simulator capacity at "
          f"SLO p{a.slo_percentile:g} TTFT <= {a.slo_ttft_ms:g} ms, TPOT <= {a.slo_tpot_ms:g} ms: "
          f"{cap:.3f} req/s", flush=True)  # fmt: skip

    probe = ServingProbe(SimpleNamespace(model=a.model, max_num_batched_tokens=a.max_num_batched_tokens,
                                         kv_cache_gib=a.kv_cache_gib, device="cpu", threads=1),
                         a.max_num_seqs)  # fmt: skip
    url = f"http://127.0.0.1:{probe.port}"
    rows = []
    try:
        asyncio.run(run_load(url, items[:2], float("inf"), a.seed))  # warm-up
        for rate in rates:
            load_before = os.getloadavg()[0]
            t0 = time.perf_counter()
            res, sent = asyncio.run(run_load(url, items, rate, a.seed))
            ttft, tpot, failed = measured(res)
            sim = simulate(model, cfg, sent, ins, outs)
            rows.append((rate, sim, ttft, tpot, failed, load_before, time.perf_counter() - t0))
    finally:
        probe.close()

    print(f"\n{'rate':>6} {'metric':>6} {'pct':>4} {'predicted':>10} {'measured':>10} {'error':>7}"
          f"   (load avg before)")  # fmt: skip
    for rate, sim, ttft, tpot, failed, la, wall in rows:
        sim_tpot = sim.tpot[outs > 1]
        for name, pred, meas in (("TTFT", sim.ttft, ttft), ("TPOT", sim_tpot, tpot)):
            for i, pct in enumerate(("p50", "p99")):
                pv, mv = pcts(pred)[i], pcts(meas)[i]
                print(f"{rate:6.3f} {name:>6} {pct:>4} {pv * 1e3:8.1f}ms {mv * 1e3:8.1f}ms "
                      f"{(pv - mv) / mv:+7.0%}   ({la:.1f})")  # fmt: skip
        q = a.slo_percentile
        ok_pred = (
            np.percentile(sim.ttft, q) <= slo.ttft_s and np.percentile(sim_tpot, q) <= slo.tpot_s
        )
        ok_meas = (len(ttft) > 0 and not failed and np.percentile(ttft, q) <= slo.ttft_s
                   and np.percentile(tpot, q) <= slo.tpot_s)  # fmt: skip
        verdict = "agree" if ok_pred == ok_meas else "DISAGREE"
        print(f"{rate:6.3f}  SLO predicted {'met' if ok_pred else 'missed'}, measured "
              f"{'met' if ok_meas else 'missed'}: {verdict}; {failed} failed, {wall:.0f} s")  # fmt: skip
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
