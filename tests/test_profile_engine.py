"""The engine's profiler writes what the planner reads: same model identity (arch_hash), same
hardware tag, a valid profile; `skybroker profile` wraps it as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from engine.config import ModelConfig
from engine.profile import arch_hash, gpu_kind, hardware_tag, profile_json
from skybroker.models import from_hf_dir
from skybroker.perf.profile import load
from skybroker.perf.roofline import Hardware, cpu_model_name

ROOT = Path(__file__).resolve().parents[1]


def test_profile_json_puts_each_served_step_on_a_line() -> None:
    data = {"source": "a, b", "serving_steps": [[16, 0, 16, 128.0, 0.0047, None],
                                                [0, 2, 40, 0, 1.5e-05, 0.0003]],
            "notes": ["x,  y"]}  # fmt: skip
    text = profile_json(data)
    assert json.loads(text) == data
    assert "  [16, 0, 16, 128.0, 0.0047, null],\n  [0, 2, 40, 0, 1.5e-05, 0.0003]\n" in text
    assert '"x,  y"' in text  # strings are left alone


def test_arch_hash_agrees_with_planner(tiny_llama_dir: Path) -> None:
    cfg = ModelConfig.from_hf_dir(tiny_llama_dir)
    arch = replace(from_hf_dir(tiny_llama_dir), dtype="float32")
    assert arch_hash(cfg, "float32") == arch.arch_hash
    assert arch_hash(cfg, "bfloat16") == replace(arch, dtype="bfloat16").arch_hash


@pytest.mark.parametrize(
    "device_name, kind",
    [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB",
     "A100-80GB"), ("NVIDIA A100-SXM4-40GB", "A100"), ("NVIDIA A10G", "A10G"), ("Tesla T4", "T4"),
     ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"), ("Tesla V100-SXM2-32GB", "V100-32GB")],
)  # fmt: skip
def test_gpu_kind_is_the_catalog_name(device_name: str, kind: str) -> None:
    assert gpu_kind(device_name) == kind


def test_cpu_tag_is_the_planners(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    tag = hardware_tag(torch.device("cpu"), 1)
    assert tag["kind"] == "cpu" and tag["name"] == cpu_model_name()
    assert tag["torch_threads"] == torch.get_num_threads()


def test_cli_rejects_missing_model(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "skybroker", "profile", "--model",
                        str(tmp_path / "nope")], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.mark.slow
def test_profile_end_to_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`skybroker profile` runs the engine, and the planner matches the result to this CPU."""
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "skybroker", "profile", "--model",
                        str(tiny_llama_dir), "--out", str(out), "--max-batch", "2",
                        "--max-context", "64", "--repeats", "1", "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    prof = load(out)
    data = json.loads(out.read_text())
    assert len(prof.points) >= 6 and all(p["seconds"] > 0 for p in prof.points)
    assert {p["num_decode_seqs"] for p in prof.points} >= {0, 1, 2}
    arch = replace(from_hf_dir(tiny_llama_dir), dtype="float32")
    import os

    hw = Hardware("cpu", cpu_model_name(), os.cpu_count() or 1, 1.0, 1.0, 1.0)
    assert prof.mismatch(arch, hw) is None
    assert data["hardware"]["torch_threads"] >= 1 and "on cpu:" in r.stdout
    # the server's own overhead, timed against a real engine.serve
    assert set(prof.serving) >= {"request_overhead_s", "step_overhead_s", "per_seq_overhead_s"}
    assert 0 <= prof.serving["request_overhead_s"] < 5 and "server overhead" in r.stdout


def test_serving_only_needs_an_existing_profile(tmp_path: Path) -> None:
    from engine.profile import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--out", str(tmp_path / "none.json"), "--serving-only"])
    (tmp_path / "p.json").write_text("{}")
    args = parse_args(["--model", "m", "--out", str(tmp_path / "p.json"), "--serving-only"])
    assert args.serving_only
