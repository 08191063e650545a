"""Savings of the planner's placement over two baselines on three workloads.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/plan_savings.py

Workloads (8B model, US-east + EU-west users, RTT <= 60 ms, on-demand, bundled catalog):
short chat, long context, and a mixed histogram. Baselines use the same perf predictions:
`cheapest_single_gpu` = the ILP restricted to one GPU kind (best kind), `skypilot` = the
cheapest instance type that fits and serves every request class, replicated to meet the rate.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("SKYBROKER_HOME", "/tmp/skybroker-bench")  # perf cache shared with plan_speed

from skybroker.catalog import load_catalog
from skybroker.plan import make_plan
from skybroker.spec import load_spec

BASE = """
name: {name}
infra: skypilot
model: meta-llama/Llama-3.1-8B-Instruct
workload:
  rate: {rate}
  input_tokens: {inp}
  output_tokens: {out}
  users: {{us-east: 0.6, eu-west: 0.4}}
slo: {{ttft_ms: {ttft}, tpot_ms: {tpot}, percentile: 99, max_rtt_ms: 60}}
constraints: {{spot: never}}
engine: {{max_model_len: 16384}}
"""
WORKLOADS = {
    "short-chat": dict(rate=30, inp="{mean: 300, p50: 200, p99: 1500}",
                       out="{mean: 150, p50: 100, p99: 600}", ttft=1000, tpot=50),
    "long-context": dict(rate=5, inp="{mean: 6000, p50: 5000, p99: 14000}",
                         out="{mean: 300, p50: 250, p99: 1000}", ttft=6000, tpot=80),
    "mixed": dict(rate=15, inp="{histogram: [[150, 6], [1500, 3], [8000, 1]]}",
                  out="{histogram: [[100, 5], [400, 4], [1500, 1]]}", ttft=4000, tpot=60),
}  # fmt: skip


def main() -> None:
    cat = load_catalog()
    for name, w in WORKLOADS.items():
        t0 = time.perf_counter()
        plan = make_plan(load_spec(BASE.format(name=name, **w)), cat)
        kinds = sorted({p.offering.gpu for p in plan.placements})
        line = f"{name:13s} plan ${plan.cost_per_hour:7.2f}/h ({', '.join(kinds)})"
        for base, cost in plan.baselines.items():
            if cost:
                line += f" | {base} ${cost:7.2f}/h, saves {1 - plan.cost_per_hour / cost:5.1%}"
            else:
                line += f" | {base}: none"
        print(line + f"  [{time.perf_counter() - t0:.0f} s]")
        for base, note in plan.baseline_notes.items():
            print(f"{'':13s}   {base}: {note}")


if __name__ == "__main__":
    main()
