"""Builds and loads `cpu_attention.cpp`: the CPU kernel of `torch.ops.skybroker.paged_attention`
(KV write and attention of one layer for the whole step in one C++ call).

The library is compiled once per source, torch version and compiler with the C++ compiler
inductor uses (`$CXX` or `g++`), into a cache directory, and loaded into the process. Once
loaded, the op's CPU calls run it and `kernels.attention_op.step_context` hands it each step's
cache layout; until then the op runs the torch path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
_loaded: str | None = None


def is_loaded() -> bool:
    return _loaded is not None


_BUILD = 2  # the build's recipe: a change rebuilds cached libraries


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "g++"
    path = shutil.which(cxx)
    if path is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (set $CXX)")
    return path


def _commands(cxx: str, src: Path, out: Path) -> list[list[str]]:
    """Compile, then link. -ffast-math (reductions and exp vectorised; scores are finite:
    softmax subtracts the max) is given to the compile only: linked with it, gcc adds
    crtfastmath.o, whose constructor sets flush-to-zero for the whole process when the
    library loads, and tiny floats everywhere else would read as 0."""
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    obj = out.with_suffix(".o")
    compile_ = [cxx, "-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-std=c++17"]
    compile_ += ["-c", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", str(src), "-o", str(obj)]
    compile_ += [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    link = [cxx, "-shared", str(obj), "-o", str(out)]
    for p in library_paths():
        link += [f"-L{p}", f"-Wl,-rpath,{p}"]
    return [compile_, [*link, "-lc10", "-ltorch_cpu", "-ltorch"]]


def library_path(cache_dir: str | os.PathLike) -> Path:
    """Where the compiled library for this source, torch and compiler lives under `cache_dir`."""
    cxx = _compiler()
    key = hashlib.sha256(
        SOURCE.read_bytes() + f"{torch.__version__}|{cxx}|{sys.version}|{_BUILD}".encode()
    ).hexdigest()[:16]
    return Path(cache_dir) / f"skybroker_cpu_attention-{key}.so"


def build(cache_dir: str | os.PathLike) -> tuple[Path, float]:
    """Build the library unless cached: its path and the seconds the build took (0 if cached).
    Raises RuntimeError naming the compiler's error when it cannot be built. Safe to run in a
    thread beside other work (the compiler is a subprocess)."""
    so = library_path(cache_dir)
    if so.is_file():
        return so, 0.0
    import time

    so.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        part = Path(tmp) / so.name
        for cmd in _commands(_compiler(), SOURCE, part):
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode:
                raise RuntimeError(f"building {SOURCE.name} failed: {res.stderr.strip()[-2000:]}")
        os.replace(part, so)  # atomic: a concurrent build loads one whole library
    return so, time.perf_counter() - t0


def load_built(so: Path) -> None:
    """Load a library `build` made. Not inside a step (`kernels.attention_op.step_context`
    hands the layout to the kernel only when it was loaded on entering)."""
    global _loaded
    if _loaded is None:
        torch.ops.load_library(str(so))
        _loaded = str(so)


def load(cache_dir: str | os.PathLike) -> float:
    """Build (unless cached) and load the library; the seconds the build took (0 if cached).
    Raises RuntimeError naming the compiler's error when it cannot be built."""
    if _loaded is not None:
        return 0.0
    so, seconds = build(cache_dir)
    load_built(so)
    return seconds
