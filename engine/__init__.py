"""The bundled paged-attention serving engine.

It runs on every replica the broker launches. It imports `kernels` and torch, never `skybroker`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.config import EngineArgs
    from engine.llm import LLM
    from engine.llm_engine import LLMEngine
    from engine.outputs import CompletionOutput, RequestOutput
    from engine.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "EngineArgs", "LLMEngine", "RequestOutput", "SamplingParams"]

# Imported on first use: the server's HTTP process needs the light modules only, and
# importing torch costs seconds per process.
_HOMES = {
    "EngineArgs": "engine.config",
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "CompletionOutput": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
