"""End to end through the CLI: launch a tiny real model on the local infra via the broker API,
chat through the printed endpoint with the `openai` client, read status and logs, then down.

The broker API is served by uvicorn in a thread with the real Controller and its reconcile
loop, as `python -m skybroker.server` runs them; the replica is a real `engine.serve` process.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

if importlib.util.find_spec("engine.llm_engine") is None:  # the engine is another branch
    pytest.skip("the engine (engine.llm_engine) is not in this tree", allow_module_level=True)

import openai
import yaml
from typer.testing import CliRunner

from skybroker.api import create_app
from skybroker.cli import app
from skybroker.controller import Controller
from skybroker.provision.local import process_start_time
from tests.broker_servers import reconciling_controller_at, served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path
) -> Iterator[tuple[str, Controller]]:
    monkeypatch.delenv("SKYBROKER_API_TOKEN", raising=False)
    with (
        reconciling_controller_at(tmp_path, 0.1) as controller,
        # the model dir is the one directory API specs may name files in
        served(create_app(controller, allowed_paths=[tiny_llama_dir])) as url,
    ):
        yield url, controller


def test_launch_chat_status_logs_down(
    broker: tuple[str, Controller], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    api_url, controller = broker
    spec = tmp_path / "e2e.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "cli-e2e",
                "infra": "local",
                "model": {"path": str(tiny_llama_dir)},
                "workload": {"rate": 0.05, "input_tokens": 16, "output_tokens": 8},
                "slo": {"ttft_ms": 30000, "tpot_ms": 5000, "percentile": 90},
                "engine": {"max_model_len": 256, "kv_cache_gib": 0.05, "max_num_seqs": 8},
            }
        )
    )
    runner = CliRunner()
    r = runner.invoke(app, ["launch", str(spec), "--yes", "--timeout", "600", "--api-url", api_url])
    assert r.exit_code == 0, r.output
    endpoint = re.search(r"endpoint: (http://\S+/v1)", r.output)
    assert endpoint is not None, r.output
    assert "ready" in r.output

    key = re.search(r"api key: (sk-[0-9a-f]+)", r.output)
    assert key is not None, r.output
    with pytest.raises(openai.AuthenticationError):  # the endpoint wants its key
        openai.OpenAI(base_url=endpoint.group(1), api_key="none", max_retries=0).models.list()
    client = openai.OpenAI(
        base_url=endpoint.group(1), api_key=key.group(1), max_retries=0, timeout=60
    )
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert chat.usage.completion_tokens == 4

    r = runner.invoke(app, ["status", "cli-e2e", "--api-url", api_url])
    assert r.exit_code == 0 and "READY" in r.output and "1/1 ready" in r.output
    r = runner.invoke(app, ["logs", "cli-e2e", "--replica", "0", "--api-url", api_url])
    assert r.exit_code == 0 and "engine.serve" in r.output

    pid = controller.replicas("cli-e2e")[0].handle["info"]["pid"]
    r = runner.invoke(app, ["down", "cli-e2e", "--api-url", api_url])
    assert r.exit_code == 0 and "torn down" in r.output
    assert controller.get("cli-e2e") is None
    assert process_start_time(pid) is None  # the engine process is gone
