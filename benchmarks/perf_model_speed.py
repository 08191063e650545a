"""End-to-end `skybroker plan` time, cold (empty capacity cache) and warm, per spec.

Each run is `python -m skybroker plan SPEC --json` in a fresh process (imports, catalog,
perf model, ILP, baselines: what a user waits for). Cold runs get an empty SKYBROKER_HOME;
warm runs reuse the home of a finished cold run (capacity results on disk). Prints the
median of --repeats runs, the perf model's own share (`solver.perf_time_s`) and the load
average. Specs: the three examples and the world-wide 8B spec of benchmarks/plan_speed.py.

    OMP_NUM_THREADS=1 python benchmarks/perf_model_speed.py [--repeats 3] [--specs a.yaml,b.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plan_once(spec: Path, home: str) -> tuple[float, float]:
    """(wall seconds, perf model seconds) of one `skybroker plan` process."""
    env = {**os.environ, "SKYBROKER_HOME": home, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "skybroker", "plan", str(spec), "--json"],
                       capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"plan {spec} failed: {r.stderr[-500:]}")
    return wall, json.loads(r.stdout)["solver"]["perf_time_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--specs", default="", help="comma-separated spec files (default: examples "
                    "+ world-wide)")  # fmt: skip
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="skybroker-speed-"))
    world = ROOT / "examples/world-chat.yaml"
    specs = [Path(s) for s in a.specs.split(",")] if a.specs else [
        ROOT / "examples/chat-8b-us-eu.yaml", ROOT / "examples/llama-70b-multi-gpu.yaml",
        ROOT / "examples/smollm2-local.yaml", world]  # fmt: skip
    print(f"{'spec':28} {'cold wall':>9} {'cold perf':>9} {'warm wall':>9} {'warm perf':>9}  load")
    for spec in specs:
        cold, warm = [], []
        load = os.getloadavg()[0]
        for i in range(a.repeats):
            home = str(tmp / f"{spec.stem}-{i}")
            cold.append(plan_once(spec, home))
            warm.append(plan_once(spec, home))
        med = [statistics.median(x[k] for x in runs) for runs in (cold, warm) for k in (0, 1)]
        print(f"{spec.name:28} {med[0]:8.2f}s {med[1]:8.2f}s {med[2]:8.2f}s {med[3]:8.2f}s  "
              f"{load:.1f}-{os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
