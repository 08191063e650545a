"""What a SkyPilot replica runs: the setup script (a Python >= 3.11 and the engine), the run
script (the engine servers and a progress line while the model downloads), and how long
the two may take (`startup_deadline_s`).

Setup never trusts the `python` on PATH (SkyPilot's default images may put an older one
there): it takes the first `python3.13 ... python3` that is >= 3.11, else has uv install one
(`uv python install 3.11`, uv itself from pip or its installer), makes a venv with it at
`VENV` and installs the engine there; without a suitable Python it exits 1 saying so.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from skybroker.provision import ReplicaSpec, engine_command, shell_join

VENV = "$HOME/.skybroker/venv"
PYTHON = f"{VENV}/bin/python"
MIN_PYTHON = (3, 11)
NO_PYTHON = "skybroker: no Python >= 3.11 on this replica and uv could not install one"
PROGRESS_MARK = "[skybroker] model cache"
PROGRESS_EVERY_S = 30

# Startup budget of a replica, from the end of `sky launch` to the engine's first 200:
# setup (uv installs torch, triton and the engine: ~3 GB of wheels), the model download
# (hub ids only: a local model travels with the launch's file_mounts) and its load.
INSTALL_S = 600.0
LOAD_BYTES_PER_S = 200e6  # safetensors from the instance's disk into GPU memory
MARGIN = 1.5
MIN_DEADLINE_S = 900.0
UNKNOWN_WEIGHT_BYTES = 16e9  # a model the broker cannot size: taken as an 8B in bf16
# Sustained download rate from the Hugging Face hub, per cloud: an assumption, about a
# twelfth of what the network allows. The catalog has no bandwidth column; AWS's EC2 user
# guide ("Amazon EC2 instance network bandwidth") caps traffic through an internet gateway
# at 5 Gbps (625 MB/s) for instances under 32 vCPUs and any single flow at 5 Gbps, and one
# hub download rarely fills that. GCP and Azure get AWS's figure (not checked against their
# documentation); clouds without a figure here (RunPod, Lambda, ...) get half of it.
DOWNLOAD_BYTES_PER_S: dict[str, float] = {"aws": 50e6, "gcp": 50e6, "azure": 50e6}
DEFAULT_DOWNLOAD_BYTES_PER_S = 25e6


def pick_python_script() -> str:
    """Bash that sets $SB_PY to a Python >= MIN_PYTHON (found or installed by uv), else
    prints NO_PYTHON and exits 1."""
    major, minor = MIN_PYTHON
    check = f"import sys; sys.exit(sys.version_info < ({major}, {minor}))"
    candidates = " ".join(f"python3.{m}" for m in range(13, minor - 1, -1)) + " python3 python"
    return "\n".join(
        [
            'export PATH="$HOME/.local/bin:$PATH"',
            "SB_PY=",
            f"for c in {candidates}; do",
            f'  if command -v "$c" >/dev/null 2>&1 && "$c" -c {shlex.quote(check)} 2>/dev/null; then',
            '    SB_PY="$(command -v "$c")"; break',
            "  fi",
            "done",
            'if [ -z "$SB_PY" ]; then',
            "  command -v uv >/dev/null 2>&1 || python3 -m pip install -q --user uv >/dev/null 2>&1 "
            "|| (curl -LsSf https://astral.sh/uv/install.sh | sh) >/dev/null 2>&1 || true",
            f"  command -v uv >/dev/null 2>&1 && uv python install {major}.{minor} "
            f'&& SB_PY="$(uv python find {major}.{minor})"',
            "fi",
            f'if [ -z "$SB_PY" ]; then echo {shlex.quote(NO_PYTHON)} >&2; exit 1; fi',
            'echo "[skybroker] python: $SB_PY ($("$SB_PY" --version 2>&1))"',
        ]
    )


def setup_script(install_target: str) -> str:
    """The Task's setup: a Python >= 3.11, a venv at VENV, `install_target` installed in it
    (`-e '.[extras]'` for a source tree, `'/path/skybroker.whl[extras]'` for a wheel)."""
    return "\n".join(
        [
            "set -e",
            pick_python_script(),
            f'if command -v uv >/dev/null 2>&1; then uv venv -q --allow-existing --python "$SB_PY" {VENV}; '
            f'else "$SB_PY" -m venv {VENV}; fi',
            f"if command -v uv >/dev/null 2>&1; then uv pip install -q --python {PYTHON} "
            f"{install_target}; else {PYTHON} -m pip install -q {install_target}; fi",
        ]
    )


def progress_loop(pids: str) -> str:
    """Bash: while the engines `pids` live, print the model cache's size every
    PROGRESS_EVERY_S when it changed (so a long download shows progress in the job's log)."""
    cache = '"${HF_HOME:-$HOME/.cache/huggingface}"'
    return (
        f"(prev=; while kill -0 {pids} 2>/dev/null; do "
        f"s=$(du -sb {cache} 2>/dev/null | cut -f1); "
        f'[ -n "$s" ] && [ "$s" != "$prev" ] && echo "{PROGRESS_MARK}: $s bytes"; '
        f"prev=$s; sleep {PROGRESS_EVERY_S}; done) &"
    )


def run_script(spec: ReplicaSpec, ports: list[int], tls: tuple[str, str] | None = None) -> str:
    """The Task's run: one engine per port (each on its own GPUs when there are several),
    with the venv's Python, serving HTTPS with the `tls` (cert, key) files when given; the
    job ends with the first engine's exit status."""
    tp = spec.tensor_parallel_size
    lines = []
    for i, port in enumerate(ports):
        cmd = shell_join(engine_command(spec, "0.0.0.0", port, python="python", tls=tls))
        cmd = PYTHON + cmd[len("python") :]  # $HOME must expand: not quoted
        gpus = ",".join(str(g) for g in range(i * tp, (i + 1) * tp))
        prefix = f"CUDA_VISIBLE_DEVICES={gpus} " if len(ports) > 1 else ""
        lines += [f"{prefix}{cmd} &", 'pids="$pids $!"']
    return "\n".join(
        [
            "pids=",
            *lines,
            progress_loop("$pids"),
            "wait -n $pids; code=$?",
            "kill $pids 2>/dev/null",
            "exit $code",
        ]
    )


def weight_bytes(model: str) -> float | None:
    """The bytes of `model`'s weights: a local file or directory's size, a known hub model's
    parameters x dtype; None when unknown."""
    path = Path(model).expanduser()
    if path.is_file():
        return float(path.stat().st_size)
    if path.is_dir():
        return float(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
    from skybroker.models import lookup

    arch = lookup(model)
    return arch.weight_bytes if arch else None


def startup_deadline_s(spec: ReplicaSpec) -> float:
    """Seconds a replica may take from launched to healthy: install + download (hub ids) +
    load, times MARGIN, at least MIN_DEADLINE_S."""
    size = weight_bytes(spec.model) or UNKNOWN_WEIGHT_BYTES
    local = Path(spec.model).expanduser().exists()
    rate = DOWNLOAD_BYTES_PER_S.get(spec.cloud, DEFAULT_DOWNLOAD_BYTES_PER_S)
    download = 0.0 if local else size / rate
    load = size / LOAD_BYTES_PER_S
    return float(max(MIN_DEADLINE_S, math.ceil((INSTALL_S + download + load) * MARGIN)))
