"""The bundled paged-attention serving engine.

It runs on every replica the broker launches. It imports `kernels` and torch, never `skybroker`.
"""

from engine.config import EngineArgs
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "EngineArgs", "LLMEngine", "RequestOutput", "SamplingParams"]
