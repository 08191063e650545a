"""Deployment spec: examples load, bad specs get errors a person can act on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from skybroker.cli import app
from skybroker.spec import SpecError, load_spec, spec_json_schema

EXAMPLES = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.yaml"))
GOOD = """
name: t
model: meta-llama/Llama-3.1-8B-Instruct
workload: {rate: 2}
"""


def test_examples_load() -> None:
    assert len(EXAMPLES) >= 3
    for path in EXAMPLES:
        spec = load_spec(path)
        assert spec.workload.rate > 0


def test_defaults_and_shorthands() -> None:
    spec = load_spec(GOOD)
    assert spec.infra == "local" and spec.model.name == "meta-llama/Llama-3.1-8B-Instruct"
    assert spec.workload.input_tokens.mean == 512
    assert spec.workload.user_shares() == {"any": 1.0}
    spec = load_spec(GOOD.replace("{rate: 2}", "{rate: 2, users: {us-east: 0.75, eu-west: 0.25}}"))
    assert spec.workload.user_shares() == {"us-east": 0.75, "eu-west": 0.25}
    spec = load_spec(GOOD.replace("{rate: 2}", "{rate: 2, users: [us-east, eu-west]}"))
    assert spec.workload.user_shares() == {"us-east": 0.5, "eu-west": 0.5}


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("", "is empty"),
        ("   \n# only a comment\n", "is empty"),
        ("name: [unclosed", "not valid YAML at line 1"),
        ("- a\n- b\n", "must be a YAML mapping"),
        (
            GOOD.replace("rate: 2", "rate: -3"),
            "workload.rate: -3 is not allowed: Input should be greater than 0",
        ),
        (GOOD.replace("rate: 2", "rate: fast"), "workload.rate: 'fast' is not allowed"),
        (GOOD + "constraints: {clouds: [aws, moon]}\n", "unknown cloud 'moon'; allowed: aws, gcp"),
        (
            GOOD + "slo: {percentile: 120}\n",
            "slo.percentile: 120 is not allowed: Input should be less than 100",
        ),
        (GOOD + "slo: {percentile: 0}\n", "slo.percentile: 0 is not allowed"),
        (GOOD + "constraints: {spot: sometimes}\n", "'never', 'allowed' or 'prefer'"),
        (GOOD + "constraints: {max_spot_share: 1.5}\n", "constraints.max_spot_share: 1.5"),
        (GOOD + "engine: {tensor_parallel: 3}\n", "power of two"),
        (GOOD + "colour: blue\n", "colour: unknown field"),
        (
            GOOD.replace("model: meta-llama/Llama-3.1-8B-Instruct", "model: {dtype: bfloat16}"),
            "give a model name",
        ),
        ("name: t\nworkload: {rate: 1}\n", "model: required field is missing"),
        (
            GOOD.replace("rate: 2", "rate: 2, input_tokens: {mean: 100, p50: 90, p99: 50}"),
            "must not decrease",
        ),
        (
            GOOD.replace("{rate: 2}", "{rate: 2, users: {us-east: 0.6, eu-west: 0.6}}"),
            "workload.users: the shares must sum to 1 (each is a share of the rate); these sum to 1.2",
        ),
    ],
)
def test_bad_specs_name_the_field(text: str, expect: str) -> None:
    with pytest.raises(SpecError) as err:
        load_spec(text)
    assert expect in str(err.value)


def test_missing_file() -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(Path("/nonexistent/deploy.yaml"))


def test_schema_is_json_schema() -> None:
    schema = json.loads(spec_json_schema())
    assert {"name", "model", "workload", "slo", "constraints"} <= set(schema["properties"])
    out = CliRunner().invoke(app, ["spec", "schema"])
    assert out.exit_code == 0 and json.loads(out.output)["title"] == "skybroker deployment spec"


def test_cli_renders_spec_errors_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("rate: 2", "rate: -1"))
    out = subprocess.run([sys.executable, "-m", "skybroker", "plan", str(bad)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2
    assert "workload.rate: -1 is not allowed" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
