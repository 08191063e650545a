"""The docs say what the code does: every CLI command and REST route is in a table, every
benchmark script is described, every example passes `spec check`, every shell block is marked
and the runnable ones run, the spec reference is the one the schema renders, and the tree
tells no history.

Shell blocks in README.md and docs/*.md are fenced ```bash runnable (quick: run here, in CI)
or ```bash long-running (a launch, a server, a benchmark: listed, not run).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from fastapi.routing import APIRoute

from skybroker.api import create_app
from skybroker.cli import app
from skybroker.spec_docs import generated_part, render

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)
SHELL = ("bash", "sh", "shell", "console")
MARKS = ("runnable", "long-running")


def _table_rows() -> list[str]:
    return [line for doc in DOCS for line in doc.read_text().splitlines() if line.startswith("|")]


def _commands(cmd: Any, prefix: str) -> list[str]:
    if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
        return [c for name, sub in cmd.commands.items() for c in _commands(sub, f"{prefix} {name}")]
    return [prefix]


def _blocks() -> list[tuple[Path, str, str]]:
    """(doc, info string, body) of every fenced block."""
    return [(doc, m[1].strip(), m[2]) for doc in DOCS for m in FENCE.finditer(doc.read_text())]


def test_every_cli_command_is_in_a_docs_table() -> None:
    commands = _commands(typer.main.get_command(app), "skybroker")
    assert len(commands) >= 15
    rows = _table_rows()
    missing = [c for c in commands if not any(f"`{c}" in row for row in rows)]
    assert not missing, f"CLI commands in no README/docs table: {missing}"


def test_every_rest_route_is_in_a_docs_table() -> None:
    routes = [(m, r.path) for r in create_app(None).routes
              if isinstance(r, APIRoute) and r.include_in_schema for m in r.methods]  # fmt: skip
    assert len(routes) >= 9
    for where in (ROOT / "README.md", ROOT / "docs" / "server-api.md"):
        rows = [line for line in where.read_text().splitlines() if line.startswith("|")]
        missing = [(m, p) for m, p in routes
                   if not any(f"| {m} |" in row and f"`{p}`" in row for row in rows)]  # fmt: skip
        assert not missing, f"REST routes in no table of {where.name}: {missing}"


def test_every_benchmark_script_is_in_benchmarks_md() -> None:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    scripts = [
        p.name for p in sorted((ROOT / "benchmarks").iterdir()) if p.suffix in (".py", ".sh")
    ]
    missing = [name for name in scripts if f"`{name}`" not in text]
    assert not missing, f"benchmarks not described in docs/benchmarks.md: {missing}"


def test_every_example_passes_spec_check() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        out = subprocess.run([sys.executable, "-m", "skybroker", "spec", "check", str(path)],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"{path}: ok")


def test_every_shell_block_is_marked_runnable_or_long_running() -> None:
    unmarked = [(doc.name, info) for doc, info, _ in _blocks()
                if info.split(" ")[0] in SHELL and not any(m in info.split() for m in MARKS)]  # fmt: skip
    assert not unmarked, f"mark these ```bash runnable or ```bash long-running: {unmarked}"
    assert any("runnable" in info.split() for doc, info, _ in _blocks() if doc.name == "README.md")


@pytest.mark.slow
def test_runnable_shell_blocks_run(tmp_path: Path) -> None:
    env = {**os.environ, "SKYBROKER_HOME": str(tmp_path / "home"), "COLUMNS": "80",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    env.pop("SKYBROKER_API_URL", None)
    ran = 0
    for doc, info, body in _blocks():
        if "runnable" not in info.split():
            continue
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert out.returncode == 0, f"{doc.name} block failed:\n{body}\n{out.stdout}{out.stderr}"
        assert "Traceback" not in out.stderr
        ran += 1
    assert ran >= 3


def test_spec_reference_is_generated_from_the_schema() -> None:
    text = (ROOT / "docs" / "spec.md").read_text()
    assert generated_part(text) == render(), (
        "docs/spec.md is out of date: python -m skybroker.spec_docs --write docs/spec.md"
    )


def test_readme_is_short_and_its_links_resolve() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 12_500
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


# Work-period numbers, nicknames for the machine a figure came from, first-person accounts.
HISTORY = re.compile(r"\bsessions?[-\s]+\d|\bthis\s+VM\b|\bdev\s+(VM|box)\b|"
                     r"\bshared\s+2-core\b|\bI\s+(tried|measured)\b", re.I)  # fmt: skip


def test_the_tree_speaks_of_the_product_only() -> None:
    """Docs, code, tests and data READMEs say what is and where a figure was measured, not
    when or by whom (this file included)."""
    files = [*DOCS, *ROOT.glob("catalogs/**/README.md")]
    for d in ("skybroker", "engine", "kernels", "benchmarks", "tests", "examples"):
        files += [p for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh", ".yaml", ".md")]
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if HISTORY.search(line)]  # fmt: skip
    assert not hits, "history belongs in commit messages:\n" + "\n".join(hits)
