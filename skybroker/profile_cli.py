"""`skybroker profile`: measure the bundled engine on this machine for the planner.

Runs `python -m engine.profile` as a subprocess (skybroker never imports the engine) and
writes the profile to --out, by default `$SKYBROKER_HOME/profiles/<model>-<hardware>.json`,
where the planner finds it (`skybroker.perf.profile.find_profile`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer


def default_out(model: Path) -> Path:
    from skybroker.perf.roofline import skybroker_home

    return skybroker_home() / "profiles" / f"{model.name.removesuffix('.gguf')}-local.json"


def profile_command(
    model: Path = typer.Option(..., "--model", help="HF model directory or .gguf file"),
    out: Path | None = typer.Option(None, "--out", help="profile JSON (default: SKYBROKER_HOME)"),
    grid: str = typer.Option("auto", "--grid", help="auto (gpu on CUDA) | cpu | gpu"),
    max_batch: int | None = typer.Option(
        None, "--max-batch", min=1, help="largest decode batch [default: 16 cpu, 256 gpu]"
    ),
    max_context: int | None = typer.Option(
        None, "--max-context", min=1, help="largest decode context [default: 1024 cpu, 2048 gpu]"
    ),
    repeats: int = typer.Option(5, "--repeats", min=1, help="steps per point (median kept)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", min=1),
    kv_cache_gib: float = typer.Option(1.0, "--kv-cache-gib", min=0.01, help="CPU KV cache"),
    max_num_batched_tokens: int | None = typer.Option(
        None, "--max-num-batched-tokens", min=1, help="[default: 2048 cpu, 8192 gpu]"
    ),
    serving: bool = typer.Option(
        True, "--serving/--no-serving", help="also time a real engine.serve (its own overhead)"
    ),
    serving_seconds: float = typer.Option(
        60.0, "--serving-seconds", min=1.0, help="about how long the serving probe's loads step"
    ),
) -> None:
    """Measure the engine's step times on this hardware; the planner then uses them."""
    if not model.exists():
        typer.echo(f"--model: {model} does not exist (an HF model dir or a .gguf file)", err=True)
        raise typer.Exit(2)
    if device not in ("auto", "cpu", "cuda"):
        typer.echo(f"--device must be auto, cpu or cuda, got {device!r}", err=True)
        raise typer.Exit(2)
    if grid not in ("auto", "cpu", "gpu"):
        typer.echo(f"--grid must be auto, cpu or gpu, got {grid!r}", err=True)
        raise typer.Exit(2)
    out = out or default_out(model)
    cmd = [sys.executable, "-m", "engine.profile", "--model", str(model), "--out", str(out),
           "--grid", grid, "--repeats", str(repeats), "--device", device,
           "--tensor-parallel-size", str(tensor_parallel_size), "--kv-cache-gib",
           str(kv_cache_gib), "--serving-seconds", str(serving_seconds)]  # fmt: skip
    for flag, value in (("--max-batch", max_batch), ("--max-context", max_context),
                        ("--max-num-batched-tokens", max_num_batched_tokens)):  # fmt: skip
        if value is not None:
            cmd += [flag, str(value)]
    if not serving:
        cmd.append("--no-serving")
    rc = subprocess.call(cmd)
    if rc != 0:
        typer.echo(f"engine profiler failed (exit {rc}): {' '.join(cmd)}", err=True)
        raise typer.Exit(rc)
    from skybroker.perf.profile import load

    prof = load(out)
    f = prof.fit
    typer.echo(f"{out}: {prof.model['name']} on {prof.hardware_tag}, {len(prof.points)} points; "
               f"step = {f['intercept'] * 1e3:.2f} ms + {f['per_prefill_token'] * 1e6:.1f} us/"
               f"prompt token + {f['per_decode_seq'] * 1e3:.2f} ms/decode seq + "
               f"{f['per_context_token'] * 1e9:.1f} ns/context token + "
               f"{f['per_attn_pair'] * 1e9:.2f} ns/prefill attention pair")  # fmt: skip
    if prof.step_noise:
        q = prof.step_noise
        typer.echo(f"step-time spread over the shape's median: {q[0]:.2f}x .. {q[-1]:.2f}x "
                   f"(middle {q[len(q) // 2]:.2f}x)")  # fmt: skip
    if prof.serving:
        s = prof.serving
        typer.echo(f"server overhead: {s['request_overhead_s'] * 1e3:.1f} ms/request, "
                   f"{s['step_overhead_s'] * 1e3:.2f} ms/step + "
                   f"{s['per_seq_overhead_s'] * 1e3:.2f} ms/sequence per step")  # fmt: skip
