"""Where an engine step's time goes when the arithmetic is negligible: eager against compiled.

    PYTHONPATH=. python benchmarks/host_overhead.py [--baseline-tree ../main] [--rounds 2]

Two models built offline with the tests' fixture (random weights, its small tokenizer): a
Llama of 8B's depth at width 64 (32 layers, 4 heads of 16, GQA 2) and the 3-layer 192-wide
model. For each, in one run, one process per configuration and round (one torch thread):
`baseline` (another source tree's engine, e.g. the unmodified main, eager), `eager` and
`compiled` (this tree, `enforce_eager` True / False, inductor's Python wrapper: the CUDA
default) and `compiled-cpp` (its C++ wrapper: the CPU default). The first compiled process
of each kind starts with an empty compile cache (first start), later rounds find it warm
(restart).

Per batch size (1, 8, 64 sequences decoding 16-token prompts) it times `--steps` decode steps
the way `LLM.generate` steps the engine, split by wrapping the engine's seams: scheduling,
input preparation, model (inputs to the device, forward, logits), sampling, and the rest
(stop checks, outputs, the loop). It prints median ms per step, each part's share, and each
configuration's speed against the first one; `gen ms/step` is a whole `LLM.generate` (prefill
and final detokenization included) divided by its steps. Figures, not asserts.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "deep-32x64": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=32,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "test-3x192": dict(
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
    ),
}
PARTS = ("schedule", "prepare", "model", "sample", "rest")


def build_models(root: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_models import build_tiny_model

    dirs = {}
    for name, dims in MODELS.items():
        d = root / name
        if not (d / "config.json").is_file():
            build_tiny_model(d, "llama", rope_scaling=None, max_position_embeddings=1024, **dims)
        dirs[name] = d
    return dirs


# -- worker: one engine, every batch size ---------------------------------------------------
class _Timed:
    def __init__(self, fn, part: str, acc: dict[str, float]) -> None:
        self.fn, self.part, self.acc = fn, part, acc

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.acc[self.part] += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self.fn, name)


def _instrument(eng, acc: dict[str, float]) -> None:
    import engine.llm_engine as mod

    eng.scheduler.schedule = _Timed(eng.scheduler.schedule, "schedule", acc)
    eng.runner.call = _Timed(eng.runner.call, "model", acc)
    eng.sampler = _Timed(eng.sampler, "sample", acc)
    if hasattr(eng, "_prepare_inputs"):
        eng._prepare_inputs = _Timed(eng._prepare_inputs, "prepare", acc)
    else:  # a tree whose step calls the module-level prepare_inputs
        mod.prepare_inputs = _Timed(mod.prepare_inputs, "prepare", acc)


def _capture_inputs(eng) -> list:
    """While the returned list's first item is None, each executed step's inputs are copied
    into it (for `floor`); the caller sets it to None for the steps it wants."""
    import torch

    box: list = [False]
    call = eng.runner.call

    def capturing(method: str, *payload):
        if method == "execute" and box[0] is None:
            x = payload[0]
            tensors = {f.name: getattr(x, f.name).clone() for f in dataclasses.fields(x)
                       if isinstance(getattr(x, f.name), torch.Tensor)}  # fmt: skip
            box[0] = dataclasses.replace(x, **tensors)
        return call(method, *payload)

    eng.runner.call = capturing
    return box


def floor(eng, inputs, cache: str, reps: int = 20) -> dict[str, float]:
    """What the step's arithmetic costs alone, for one decode step's inputs (its batch and
    contexts): every linear layer as one `F.linear` on that many rows (the LM head on the
    logits rows), and the C++ attention kernel over every layer's KV cache with those block
    tables and contexts (nothing written). The model's elementwise ops (norms, RoPE, SiLU,
    residuals) are left out, so a step cannot run below the sum. Median ms of `reps` rounds."""
    import torch
    import torch.nn.functional as F
    from cpu_attention import attention_ms, median_ms  # benchmarks/cpu_attention.py

    from kernels import cpu_attention

    cpu_attention.load(cache)
    runner = eng.runner
    model, rows = runner.model, inputs.input_ids.shape[0]
    linears = [(m.weight, torch.randn(rows, m.in_features)) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not model.lm_head]  # fmt: skip
    n_logits = inputs.logits_indices.shape[0]
    linears.append((model.lm_head.weight, torch.randn(n_logits, model.lm_head.in_features)))
    attn = model.layers[0].self_attn
    q = torch.randn(rows, attn.num_heads, attn.head_dim)
    k, v = torch.randn(2, rows, attn.num_kv_heads, attn.head_dim)
    ctx = runner.step_context(inputs)
    ctx.slot_mapping = torch.full_like(ctx.slot_mapping, -1)  # the C++ kernel skips slot -1

    def linear_pass() -> None:
        for w, x in linears:
            F.linear(x, w)

    layers = list(range(len(model.layers)))
    with torch.inference_mode():
        linear = median_ms(linear_pass, reps)
        attention = attention_ms(ctx, layers, q, k, v, reps, attn.scale)
    return {"linear": linear, "attention": attention,
            "context": float(inputs.decode_context_lens.float().mean())}  # fmt: skip


def worker(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    from engine import LLM, SamplingParams

    kw = dict(max_model_len=512, block_size=16, num_kv_blocks=4096, max_num_seqs=64)
    if a.mode != "baseline":
        kw["enforce_eager"] = a.mode == "eager"
        kw["compile_cache_dir"] = a.cache
        kw["compile_cpp_wrapper"] = a.mode == "compiled-cpp"
    t0, c0 = time.perf_counter(), os.times()
    llm = LLM(a.model, **kw)
    startup = time.perf_counter() - t0
    c1 = os.times()  # CPU seconds of the start, the compiler's subprocesses included
    startup_cpu = sum(c1[:4]) - sum(c0[:4])
    gc.collect()  # the startup heap frozen, as the server's engine process does (freeze_heap):
    gc.freeze()  # otherwise a full collection over it can land in a timed step
    eng = llm.llm_engine
    compiled = getattr(eng.runner, "compiled", None) is not None
    offline = "only_finished" in inspect.signature(eng.step).parameters
    step = (lambda: eng.step(only_finished=True)) if offline else eng.step
    acc = dict.fromkeys(PARTS, 0.0)
    box = _capture_inputs(eng) if a.mode != "baseline" else None
    _instrument(eng, acc)
    floors = {}
    result = {"startup_s": startup, "startup_cpu_s": startup_cpu, "compiled": compiled,
              "batches": {}}  # fmt: skip
    for b in a.batches:
        params = SamplingParams(temperature=0, max_tokens=a.steps + 8, ignore_eos=True)
        for i in range(b):
            eng.add_request(f"r{b}-{i}", [3 + (i * 7 + j) % 300 for j in range(16)], params)
        for _ in range(4):  # the prefill step, then warm decode steps
            step()
        totals, parts = [], {p: [] for p in PARTS}
        for _ in range(a.steps):
            for p in PARTS:
                acc[p] = 0.0
            t = time.perf_counter()
            step()
            dt = time.perf_counter() - t
            totals.append(dt)
            acc["rest"] = dt - sum(acc[p] for p in PARTS if p != "rest")
            for p in PARTS:
                parts[p].append(acc[p])
        if box is not None:
            box[0] = None  # the next decode step's inputs, for the floor
            step()
            floors[b], box[0] = box[0], False
        while eng.has_unfinished_requests():
            step()
        prompts = [[3 + (i * 11 + j) % 300 for j in range(16)] for i in range(b)]
        n0 = eng.counters.num_steps
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=a.steps, ignore_eos=True))
        gen = (time.perf_counter() - t) / (eng.counters.num_steps - n0)
        result["batches"][str(b)] = {
            "ms": 1e3 * statistics.median(totals),
            "parts_ms": {p: 1e3 * statistics.median(v) for p, v in parts.items()},
            "gen_ms": 1e3 * gen,
        }
    for b, inputs in floors.items():
        result["batches"][str(b)]["floor_ms"] = floor(eng, inputs, a.cache)
    gc.unfreeze()
    return result


# -- parent: configurations interleaved, rounds, the table ----------------------------------
def run_one(model: Path, mode: str, tree: Path, cache: str, a: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--mode", mode,
           "--cache", cache, "--steps", str(a.steps), "--batches", *map(str, a.batches)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{mode} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline-tree", type=Path, default=None,
                   help="source tree whose eager engine is the baseline (e.g. the unmodified main)")  # fmt: skip
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--configs", nargs="+", default=["eager", "compiled", "compiled-cpp"],
                   choices=["eager", "compiled", "compiled-cpp"], help="this tree's configurations")  # fmt: skip
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cache-dir", default=None,
                   help="compile cache to use (default: a new, empty one: the first start is cold)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, help="write every measurement here")
    p.add_argument("--record", type=Path, default=None,
                   help="write the planner's host-time fit here "
                        "(catalogs/profiles/host/engine-host-overhead.json)")  # fmt: skip
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument(
        "--mode", choices=["baseline", "eager", "compiled", "compiled-cpp"], help=argparse.SUPPRESS
    )
    p.add_argument("--cache", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    work = Path(tempfile.gettempdir()) / "skybroker-host-overhead"
    dirs = build_models(work)
    cache = a.cache_dir or tempfile.mkdtemp(prefix="compile-cache-", dir=work)
    configs = [("baseline", a.baseline_tree)] if a.baseline_tree else []
    configs += [(c, ROOT) for c in a.configs]
    runs: dict[tuple[str, str], list[dict]] = {}
    load = os.getloadavg()[0]
    for r in range(a.rounds):
        for name in a.models:
            for mode, tree in configs:
                res = run_one(dirs[name], mode, tree, cache, a)
                runs.setdefault((name, mode), []).append(res)
                print(f"round {r + 1} {name} {mode}: start {res['startup_s']:.1f} s", flush=True)
    report(runs, a, configs, load)
    if a.json:
        a.json.write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in runs.items()}, indent=1))
    if a.record:
        record(runs, a, load)
        print(f"wrote {a.record}")


def record(runs, a, load: float) -> None:
    """Fit host seconds = a + b*layers + (c + d*layers)*sequences to each step kind's best
    round (on a shared machine the least-disturbed round is the closest to the code's cost)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from skybroker.perf.roofline import cpu_model_name

    steps = {}
    for mode in a.configs:
        rows, ys, points = [], [], []
        for name in a.models:
            layers = MODELS[name]["num_hidden_layers"]
            for b in a.batches:
                ms = min(r["batches"][str(b)]["ms"] for r in runs[(name, mode)])
                rows.append([1.0, layers, b, layers * b])
                ys.append(ms / 1e3)
                points.append({"model": name, "num_layers": layers, "num_seqs": b,
                               "seconds": ms / 1e3})  # fmt: skip
        fit = np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)[0]
        steps[mode] = {"fit": [float(max(x, 0.0)) for x in fit], "points": points}
    data = {
        "schema": "skybroker-engine-host-overhead/1",
        "what": "engine step time on narrow models (arithmetic negligible): host work per step",
        "fit_form": "seconds = a + b*layers + (c + d*layers)*sequences; fit = [a, b, c, d]",
        "cpu": cpu_model_name(),
        "cores": os.cpu_count(),
        "torch_threads": 1,
        "load_average": round(load, 1),
        "rounds": a.rounds,
        "measured": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": "python benchmarks/host_overhead.py " + " ".join(sys.argv[1:]),
        "steps": steps,
    }
    a.record.parent.mkdir(parents=True, exist_ok=True)
    a.record.write_text(json.dumps(data, indent=1) + "\n")


def report(runs, a, configs, load_before: float) -> None:
    sys.path.insert(0, str(ROOT))
    from skybroker.perf.roofline import cpu_model_name

    cpu = cpu_model_name()
    print(f"\n{cpu}, {os.cpu_count()} cores, one torch thread; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")  # fmt: skip
    for name in a.models:
        print(f"\n{name}")
        first = configs[0][0]
        for mode, _ in configs:
            starts = ", ".join(
                f"{r['startup_s']:.1f}"
                + (f" ({r['startup_cpu_s']:.1f} cpu)" if "startup_cpu_s" in r else "")
                for r in runs[(name, mode)]
            )
            print(f"  {mode:12s} start (s, by round): {starts}")
        head = (
            f"  {'batch':>5} {'config':12s} {'ms/step':>8} {'vs ' + first:>9} {'gen ms/step':>11}"
        )
        print(head + f" {'/floor':>6}" + "".join(f" {p:>9}" for p in PARTS))
        for b in map(str, a.batches):
            base = None
            fl = _floor(runs, name, b)
            for mode, _ in configs:
                rs = [r["batches"][b] for r in runs[(name, mode)]]
                ms = statistics.median(r["ms"] for r in rs)
                gen = statistics.median(r["gen_ms"] for r in rs)
                base = base or ms
                parts = {q: statistics.median(r["parts_ms"][q] for r in rs) for q in PARTS}
                cells = "".join(f" {parts[q]:5.2f} {100 * parts[q] / ms:2.0f}%" for q in PARTS)
                ratio = f"{ms / fl['ms']:5.2f}x" if fl else f"{'':6}"
                print(f"  {b:>5} {mode:12s} {ms:8.2f} {base / ms:8.2f}x {gen:11.2f} {ratio}{cells}")
            if fl:
                print(f"  {b:>5} {'floor':12s} {fl['ms']:8.2f}  (linear layers {fl['linear']:.2f} + "
                      f"attention kernel {fl['attention']:.2f}, mean context {fl['context']:.0f})")  # fmt: skip


def _floor(runs, name: str, b: str) -> dict[str, float] | None:
    """The median floor (see `floor`) over every run of `name` that measured one."""
    fls = [r["batches"][b]["floor_ms"] for (n, _), rs in runs.items() if n == name for r in rs
           if "floor_ms" in r["batches"][b]]  # fmt: skip
    if not fls:
        return None
    out = {k: statistics.median(f[k] for f in fls) for k in ("linear", "attention", "context")}
    return {**out, "ms": out["linear"] + out["attention"]}


if __name__ == "__main__":
    main()
