"""One validation for spec check, plan, launch and the API: the same bad spec, the same error.

Also: which files an API spec may name (only under the server's --allow-path dirs, any with the
owner key), local model names resolving to a copy on this machine, and the CLI's one-line
errors where it used to print tracebacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from skybroker.api import OWNER_HEADER, create_app, without_probes
from skybroker.cli import app
from skybroker.models import find_local_copy
from skybroker.spec import SpecError, load_spec
from skybroker.validate import check_spec

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
CLOUD = {
    "name": "chat",
    "infra": "skypilot",
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "workload": {"rate": 2, "input_tokens": 200, "output_tokens": 50},
}
TINY_ARCH = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2,
             "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 256}  # fmt: skip
LOCAL = {
    "name": "tiny",
    "infra": "local",
    "model": {"name": "tiny-llama", "architecture": TINY_ARCH},
    "workload": {"rate": 0.5, "input_tokens": 16, "output_tokens": 8},
    "slo": {"ttft_ms": 5000, "tpot_ms": 1000, "percentile": 90},
    "engine": {"max_model_len": 128, "max_num_seqs": 4, "kv_cache_gib": 0.1},
}

# (change to CLOUD, field at fault, words of the message)
BAD = [
    ({"model": {"name": "x", "path": "/nonexistent/dir"}}, "model.path", "does not exist"),
    ({"model": "acme/Unheard-Of-9B"}, "model.name", "is not a model the planner knows"),
    ({"workload": {"rate": 2, "users": {"mars": 1.0}}}, "workload.users.mars", "not a place"),
    ({"constraints": {"gpus": ["H900"]}}, "constraints.gpus.0", "unknown GPU kind 'H900'"),
    ({"constraints": {"clouds": ["ibm"]}}, "constraints.clouds.0", "unknown cloud 'ibm'"),
    ({"constraints": {"regions": ["atlantis-1"]}}, "constraints.regions.0", "unknown region"),
    (
        {"workload": {"rate": 2, "users": {"us-east": 0.6, "eu-west": 0.6}}},
        "workload.users",
        "the shares must sum to 1 (each is a share of the rate); these sum to 1.2",
    ),
]


@pytest.fixture()
def api(tmp_path: Path) -> TestClient:
    """The app over no controller state: plans only (a deployment is never created here)."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    return TestClient(create_app(None, allowed_paths=[allowed], owner_key="owner-key"))


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("change", "field", "words"), BAD)
def test_spec_check_plan_and_api_reject_alike(
    tmp_path: Path, api: TestClient, change: dict, field: str, words: str
) -> None:
    spec = {**CLOUD, **change}
    path = _write(tmp_path, spec)
    for cmd in (["spec", "check"], ["plan"]):
        out = runner.invoke(app, [*cmd, str(path)])
        assert out.exit_code == 2, out.output
        assert f"{field}: " in out.output and words in out.output, out.output
        assert "Traceback" not in out.output
    r = api.post("/v1/plans", json=spec, headers={OWNER_HEADER: "owner-key"})  # as the CLI
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_spec" and err["field"] == field and words in err["message"]


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    spec = {**CLOUD, "model": "acme/Unheard-Of-9B", "constraints": {"gpus": ["H900"]}}
    with pytest.raises(SpecError) as err:
        check_spec(load_spec(_write(tmp_path, spec)))
    assert [f for f, _ in err.value.problems] == ["model.name", "constraints.gpus.0"]


def test_examples_pass_and_the_local_one_resolves_its_weights() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        spec = check_spec(load_spec(path))
        if spec.infra == "local" and find_local_copy("HuggingFaceTB/SmolLM2-135M-Instruct"):
            assert spec.model.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_hf_cache_snapshot_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "hub" / "models--acme--Tiny-1M"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_local_copy("acme/Tiny-1M") == snap
    assert find_local_copy("acme/Other-1M") is None


def test_local_model_needs_weights_to_launch_not_to_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKYBROKER_MODEL_DIRS", str(tmp_path))
    spec = load_spec(_write(tmp_path, LOCAL))
    assert check_spec(spec).model.path is None  # its numbers plan
    with pytest.raises(SpecError, match="no copy of 'tiny-llama' on this machine"):
        check_spec(spec, launch=True)
    (tmp_path / "tiny-llama").mkdir()
    (tmp_path / "tiny-llama" / "config.json").write_text("{}")
    assert check_spec(spec, launch=True).model.path == str(tmp_path / "tiny-llama")
    named = load_spec(_write(tmp_path, {**LOCAL, "model": "org/not-here"}))
    with pytest.raises(SpecError, match="no copy of 'org/not-here'"):
        check_spec(named)  # a bare name has nothing to plan with either


# ---------------------------------------------------------------- files an API spec may name


def _trace(path: Path) -> Path:
    path.write_text('{"input_tokens": 100, "output_tokens": 20}\n' * 5)
    return path


def test_api_specs_name_files_only_under_allowed_dirs(api: TestClient, tmp_path: Path) -> None:
    home_secret = tmp_path / "home" / "secret"
    home_secret.parent.mkdir()
    home_secret.write_text("hunter2\n")
    outside = _trace(tmp_path / "trace.jsonl")
    for field, spec in [
        ("workload.trace", {**CLOUD, "workload": {"rate": 2, "trace": "/etc/passwd"}}),
        ("workload.trace", {**CLOUD, "workload": {"rate": 2, "trace": str(home_secret)}}),
        ("workload.trace", {**CLOUD, "workload": {"rate": 2, "trace": str(outside)}}),
        ("engine.profiles.0", {**CLOUD, "engine": {"profiles": ["/etc/passwd"]}}),
        ("model.path", {**CLOUD, "model": {"name": "x", "path": "/nonexistent/dir"}}),
        ("workload.trace", {**CLOUD, "workload": {"rate": 2, "trace": "../allowed/t.jsonl"}}),
    ]:
        r = api.post("/v1/plans", json=spec)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["field"] == field, err
        assert str(tmp_path / "allowed") in err["message"] or "relative" in err["message"]
        assert "hunter2" not in r.text and "root:" not in r.text
    inside = _trace(tmp_path / "allowed" / "trace.jsonl")
    r = api.post("/v1/plans", json={**CLOUD, "workload": {"rate": 2, "trace": str(inside)}})
    assert r.status_code == 200, r.text


def test_the_owner_key_names_any_file_and_errors_quote_no_contents(api: TestClient) -> None:
    spec = {**CLOUD, "workload": {"rate": 2, "trace": "/etc/passwd"}}
    r = api.post("/v1/plans", json=spec, headers={OWNER_HEADER: "owner-key"})
    err = r.json()["error"]
    assert r.status_code == 422 and err["field"] == "workload.trace"
    assert "/etc/passwd:1: not a JSON object" in err["message"] and "root" not in r.text
    r = api.post("/v1/plans", json=spec, headers={OWNER_HEADER: "wrong"})
    assert "outside the directories" in r.json()["error"]["message"]


# ---------------------------------------------------------------- one line, not a traceback


def _sb(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "skybroker", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)  # fmt: skip


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    example = str(ROOT / "examples" / "chat-8b-us-eu.yaml")
    bad_csv = tmp_path / "cat"
    bad_csv.mkdir()
    (bad_csv / "offerings.csv").write_text(
        "cloud,region,zone,instance_type,gpu,gpu_count,gpu_memory_gib,vcpus,memory_gib,price,"
        "spot_price\naws,us-east-1,,g5.xlarge,A10G,one,24,4,16,1.0,\n"
    )
    no_trace = _write(tmp_path, {**CLOUD, "workload": {"rate": 1, "trace": "/nonexistent.jsonl"}})
    cases = [
        (["plan", example, "--catalog", "/nonexistent"], "catalog directory does not exist"),
        (["plan", example, "--catalog", str(bad_csv)], "'one' is not a whole number"),
        (["plan", str(no_trace)], "workload.trace: '/nonexistent.jsonl' does not exist"),
        (["plan", example, "--time-limit", "-1"], "--time-limit"),
        (["catalog", "offerings", "--gpu", "H900"], "unknown GPU kind 'H900'"),
    ]
    for args, words in cases:
        out = _sb(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert words in out.stderr and "Traceback" not in out.stderr + out.stdout, out.stderr


def test_catalog_refresh_without_credentials_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("boto3")
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "",
           "AWS_PROFILE": "", "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(tmp_path),
           "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}  # fmt: skip
    env = {k: v for k, v in env.items() if v} | {"AWS_DEFAULT_REGION": "us-east-1"}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    out = subprocess.run([sys.executable, "-m", "skybroker", "catalog", "refresh", "--cloud",
                          "aws", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         env={**clean, **env}, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert "aws refresh failed: NoCredentialsError" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 2


# ---------------------------------------------------------------- what a newcomer reads


def test_plan_reads_at_80_columns_and_says_the_profile_note_once() -> None:
    out = _sb("plan", str(ROOT / "examples" / "chat-8b-us-eu.yaml"), env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    assert "…" not in out.stdout and max(len(line) for line in out.stdout.splitlines()) <= 80
    assert "1. " in out.stdout and "serves (req/s): " in out.stdout
    notes = [line for line in out.stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "llama-3.1-8b-h200.json is for gpu:H200x1 only" in notes[0]
    wide = _sb("plan", str(ROOT / "examples" / "chat-8b-us-eu.yaml"), env={"COLUMNS": "220"})
    assert "┃ cloud" in wide.stdout and "…" not in wide.stdout


def test_help_shows_no_bool_tags_and_offers_completion() -> None:
    for args in (["--help"], ["launch", "--help"], ["catalog", "offerings", "--help"]):
        out = runner.invoke(app, args, env={"COLUMNS": "120"})
        assert out.exit_code == 0 and "<bool>" not in out.output, out.output
    assert "--install-completion" in runner.invoke(app, ["--help"]).output


def test_logs_leave_out_health_probes() -> None:
    log = "\n".join(
        ['INFO:     127.0.0.1:5000 - "GET /health HTTP/1.1" 200 OK'] * 50
        + ["engine ready", 'INFO:     127.0.0.1:5001 - "POST /v1/completions HTTP/1.1" 200 OK']
        + ['INFO:     127.0.0.1:5000 - "GET /health HTTP/1.1" 200 OK'] * 50
    )
    assert without_probes(log, 200).splitlines() == [
        "engine ready",
        'INFO:     127.0.0.1:5001 - "POST /v1/completions HTTP/1.1" 200 OK',
    ]
    assert without_probes(log, 1).splitlines()[-1].endswith('/v1/completions HTTP/1.1" 200 OK')


def test_docs_page_serves_swagger_ui_from_the_package(api: TestClient) -> None:
    html = api.get("/docs")
    assert html.status_code == 200 and "cdn" not in html.text.lower()
    assert "/static-offline-docs/swagger-ui-bundle.js" in html.text
    js = api.get("/static-offline-docs/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    assert api.get("/static-offline-docs/swagger-ui.css").status_code == 200
    assert json.loads(api.get("/openapi.json").text)["info"]["title"] == "skybroker"
