"""CPU the engine server's HTTP process spends per streamed token and per request.

Starts `python -m engine.serve` on the random tiny Llama (built as benchmarks/validate_perf.py
builds it), drives it with benchmarks/serve.py's client and workload (long-tailed lengths,
streamed /v1/completions, fixed seed) and reads user+system CPU seconds from /proc of the HTTP
process and of its children (the engine process) before and after each pass, and this client's
own. The HTTP process's CPU per streamed token is the figure to optimise: on a machine with
few cores every millisecond of it is taken from the engine's steps. CPU seconds depend less on
the machine's load than wall time, but not nothing (on a 2-vCPU VM shared with other work they moved by
up to 2x between passes): --baseline-root serves the same passes from a second checkout too,
interleaved pass by pass, and prints the median ratio of the pairs, the figure to compare.

Passes: all requests at once (request setup dominates), then Poisson arrivals at each
--request-rate (per-token streaming dominates); each --repeats times, medians printed.

    OMP_NUM_THREADS=1 python benchmarks/server_cpu.py                  # ~1-2 min
    OMP_NUM_THREADS=1 python benchmarks/server_cpu.py --request-rate 4 --request-rate 16
    OMP_NUM_THREADS=1 python benchmarks/server_cpu.py --baseline-root /work/main --repeats 3
    OMP_NUM_THREADS=1 python benchmarks/server_cpu.py --py-spy DIR     # profile the HTTP process
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve as bench  # noqa: E402  (benchmarks/serve.py: workload, streamed request client)
from validate_perf import tiny_model  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float, float]:
    """(user, system) CPU seconds of process `pid`, and user+system of its children."""

    def times(p: int) -> tuple[float, float]:
        stat = Path(f"/proc/{p}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) / TICK, int(fields[12]) / TICK

    kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
            for c in (t / "children").read_text().split()]  # fmt: skip
    return *times(pid), sum(sum(times(k)) for k in kids)


def one_pass(url: str, pid: int, items: list, rate: float, seed: int) -> dict[str, float]:
    """One load pass; CPU seconds of the HTTP process, the engine process and this client."""
    user0, sys0, eng0 = cpu_times(pid)
    results, wall, client = bench.timed_load(url, "bench", items, rate, seed)
    user1, sys1, eng1 = cpu_times(pid)
    http0, http1 = user0 + sys0, user1 + sys1
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0].error}")
    tokens = sum(r.output_len for r in results)
    http, eng = http1 - http0, eng1 - eng0
    return {
        "requests": len(results), "tokens": tokens, "wall_s": wall,
        "http_s": http, "http_sys_s": sys1 - sys0, "engine_s": eng, "client_s": client,
        "http_ms_per_token": http / tokens * 1e3, "http_ms_per_request": http / len(results) * 1e3,
        "engine_ms_per_token": eng / tokens * 1e3,
    }  # fmt: skip


def show(name: str, runs: list[dict[str, float]]) -> None:
    med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    print(
        f"{name:<16} {med['requests']:>4.0f} req {med['tokens']:>6.0f} tok | HTTP "
        f"{med['http_ms_per_token']:6.3f} ms/tok {med['http_ms_per_request']:7.2f} ms/req "
        f"({med['http_s']:5.2f} s, {med['http_sys_s']:4.2f} sys) | engine {med['engine_s']:5.2f} s "
        f"({med['engine_ms_per_token']:.3f} ms/tok) | client {med['client_s']:5.2f} s | "
        f"wall {med['wall_s']:5.2f} s | HTTP/engine CPU {med['http_s'] / med['engine_s']:.2f}"
        + (f" [median of {len(runs)}]" if len(runs) > 1 else "")
    )


def py_spy(pid: int, out: Path, rate: int, native: bool) -> subprocess.Popen | None:
    """py-spy sampling the thread that holds the GIL (where the CPU goes), `rate` per second."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print("py-spy not found; not profiling")
        return None
    # --native needs py-spy to pause the process per sample (it then costs the server CPU).
    mode = ["--native"] if native else ["--nonblocking"]
    cmd = [exe, "record", "-p", str(pid), "-r", str(rate), "-f", "raw", "-o", str(out), "--gil",
           *mode]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: the tiny Llama)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, action="append", default=None,
                   help="req/s of a Poisson pass (repeatable; default 8); inf: all at once")  # fmt: skip
    p.add_argument("--no-burst", action="store_true", help="skip the all-at-once pass")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-input-len", type=int, default=384)
    p.add_argument("--max-output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--py-spy", type=Path, default=None,
                   help="record the HTTP process with py-spy (raw folded stacks) per pass here")  # fmt: skip
    p.add_argument("--py-spy-rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument(
        "--native",
        action="store_true",
        help="py-spy --native (C frames too; pauses the server per sample)",
    )
    p.add_argument("--baseline-root", type=Path, default=None,
                   help="also serve from this checkout (e.g. /work/main), passes interleaved")  # fmt: skip
    a = p.parse_args()
    a.model = a.model or tiny_model()
    from engine.loader import load_model_config

    vocab = load_model_config(a.model).vocab_size
    items = bench.make_workload(a.num_prompts, vocab, a.seed, a.max_input_len, a.max_output_len)
    rates = ([] if a.no_burst else [math.inf]) + (a.request_rate or [8.0])
    roots = [ROOT] + ([a.baseline_root.resolve()] if a.baseline_root else [])
    servers = []
    try:
        for root in roots:
            servers.append(bench.start_server(a, root))
            bench.timed_load(servers[-1][1], "bench", items[:4], math.inf, a.seed)  # warm-up
        print(f"workload: {len(items)} requests, output mean "
              f"{np.mean([w.output_len for w in items]):.0f} tokens; servers from "
              f"{', '.join(map(str, roots))}")  # fmt: skip
        for rate in rates:
            name = "all at once" if math.isinf(rate) else f"Poisson {rate:g}/s"
            runs: list[list[dict[str, float]]] = [[] for _ in servers]
            for rep in range(a.repeats):
                for k, (proc, url) in enumerate(servers):  # interleaved: load drifts hit both
                    spy = None
                    if a.py_spy is not None and k == 0 and rep == 0:
                        a.py_spy.mkdir(parents=True, exist_ok=True)
                        tag = "inf" if math.isinf(rate) else f"{rate:g}"
                        spy = py_spy(
                            proc.pid, a.py_spy / f"http-{tag}.txt", a.py_spy_rate, a.native
                        )
                        time.sleep(1.0)  # py-spy attaches
                    runs[k].append(one_pass(url, proc.pid, items, rate, a.seed + rep))
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)
                        spy.wait(30)
            for k in range(len(roots)):
                show(name if k == 0 else "  baseline", runs[k])
            if len(roots) > 1:
                ratio = [r["http_ms_per_token"] / b["http_ms_per_token"]
                         for r, b in zip(runs[0], runs[1], strict=True)]  # fmt: skip
                print(
                    f"  HTTP CPU per token, this / baseline: {np.median(ratio):.3f} "
                    f"(median of {len(ratio)} interleaved pairs)"
                )
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
