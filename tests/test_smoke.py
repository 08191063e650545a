"""Smoke tests: the three packages import, the CLI answers, and the broker stays light."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import skybroker
from skybroker.cli import app

runner = CliRunner()


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "version" in result.output


def test_version_command() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert f"skybroker {skybroker.__version__}" in result.output


def test_python_dash_m_works() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "skybroker", "version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("skybroker ")


def test_cli_import_stays_light() -> None:
    """`skybroker --help` must not pull torch, SkyPilot, cloud SDKs or the engine."""
    code = (
        "import sys; from skybroker.cli import app; "
        "from typer.testing import CliRunner; CliRunner().invoke(app, ['--help']); "
        "heavy = {'torch', 'sky', 'boto3', 'botocore', 'google.cloud', 'azure', 'engine', "
        "'kernels', 'triton', 'transformers', 'pulp'}; "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_engine_and_kernels_import() -> None:
    import engine
    import kernels

    assert engine.__version__
    assert kernels.__doc__
