"""A replica's hub model: engine.hub fetches only the files the engine reads through the real
`huggingface_hub` client, from a hub endpoint on 127.0.0.1 (HF_ENDPOINT), into a temp
HF_HOME; a second start reuses the cache with the hub offline (HF_HUB_OFFLINE=1); gated and
unknown models fail with messages that say what to do, also through `python -m engine.serve`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.hub import HubError, is_hub_id, resolve_model
from tests.fake_hub import FakeHub

TOKEN = "hf_test_token"


@pytest.fixture
def hub(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    files = {p.name: p.read_bytes() for p in tiny_llama_dir.iterdir() if p.is_file()}
    files["pytorch_model.bin"] = b"not read by the engine"
    files["original/consolidated.pth"] = b"nor this"
    files["README.md"] = b"# tiny"
    gguf = {"tiny.Q8_0.gguf": b"GGUF" + b"\0" * 60, "other.gguf": b"GGUF"}
    hub = FakeHub(
        {"org/tiny-llama": files, "org/gated-llama": files, "org/tiny-gguf": gguf},
        gated={"org/gated-llama"},
        token=TOKEN,
    )
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    _reload_hub_constants()
    yield hub
    hub.close()
    monkeypatch.undo()
    _reload_hub_constants()


def _reload_hub_constants() -> None:
    """huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE once, at import."""
    import importlib

    from huggingface_hub import constants

    importlib.reload(constants)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("huggingface_hub") and hasattr(mod, "constants"):
            mod.constants = constants


def test_hub_ids_and_local_paths(tmp_path: Path) -> None:
    assert is_hub_id("meta-llama/Llama-3.1-8B-Instruct")
    assert is_hub_id("bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q8_0.gguf")
    assert not is_hub_id(str(tmp_path))  # exists: a local path
    assert not is_hub_id("llama")  # no org: not a hub id
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_fetches_only_what_the_engine_reads_then_serves_from_cache(hub: FakeHub, tiny_llama_dir):
    path = Path(resolve_model("org/tiny-llama"))
    assert str(path).startswith(os.environ["HF_HOME"])
    assert (path / "config.json").exists() and list(path.glob("*.safetensors"))
    assert not (path / "pytorch_model.bin").exists() and not (path / "README.md").exists()
    assert "pytorch_model.bin" not in hub.downloaded()
    assert "original/consolidated.pth" not in hub.downloaded()
    for f in path.iterdir():
        assert f.read_bytes() == (tiny_llama_dir / f.name).read_bytes()
    from engine.config import EngineArgs, ModelConfig

    EngineArgs(model=str(path))  # the engine accepts the directory
    assert ModelConfig.from_hf_dir(path) == ModelConfig.from_hf_dir(tiny_llama_dir)

    hub.requests.clear()
    os.environ["HF_HUB_OFFLINE"] = "1"
    _reload_hub_constants()
    assert Path(resolve_model("org/tiny-llama")) == path  # cached on the instance
    assert hub.requests == []


def test_one_gguf_file_by_name(hub: FakeHub) -> None:
    path = Path(resolve_model("org/tiny-gguf/tiny.Q8_0.gguf"))
    assert path.name == "tiny.Q8_0.gguf" and path.read_bytes().startswith(b"GGUF")
    assert hub.downloaded() == {"tiny.Q8_0.gguf"}


def test_gated_model_needs_a_token(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HubError, match=r"gated: accept its license .* \(HF_TOKEN\)"):
        resolve_model("org/gated-llama")
    with pytest.raises(HubError, match="HF_TOKEN given has no access"):
        resolve_model("org/gated-llama", token="hf_wrong")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # as SkyPilot's secret puts it on the replica
    assert (Path(resolve_model("org/gated-llama")) / "config.json").exists()


def test_unknown_model_and_offline_miss_are_clear(hub: FakeHub) -> None:
    with pytest.raises(HubError, match="no model org/missing on the hub"):
        resolve_model("org/missing")
    with pytest.raises(HubError, match="no such file"):
        resolve_model("org/tiny-gguf/absent.gguf")
    os.environ["HF_HUB_OFFLINE"] = "1"
    _reload_hub_constants()
    with pytest.raises(HubError, match=r"not in the hub cache .*HF_HUB_OFFLINE=1"):
        resolve_model("org/tiny-llama")


def test_engine_serve_says_why_a_gated_model_cannot_start(hub: FakeHub) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engine.serve", "--model", "org/gated-llama", "--port", "0"],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: hub model org/gated-llama is gated" in out.stderr
    assert "Traceback" not in out.stderr
