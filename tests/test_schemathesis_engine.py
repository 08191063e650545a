"""Property-based run of schemathesis against the engine server's OpenAPI schema.

A real uvicorn server with the tiny model (and an API key) answers every generated request,
valid or not; every built-in check runs (schemathesis's `all`): no 5xx, only documented
status codes, content types, headers and bodies, schema-invalid data rejected, schema-valid
data accepted, requests without the key refused. Bounded: few examples per operation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.server.app import ServerConfig, create_app
from tests.test_server import ENGINE_KW, MODEL, _serve

KEY = "schemathesis-key"
# As in test_schemathesis.py: the coverage phase enumerates boundary values without a bound.
COVERAGE = os.environ.get("SKYBROKER_SCHEMATHESIS_COVERAGE") == "1"


def _unused() -> LLMEngine:
    raise AssertionError("this app only gives its schema")


# What a JSON schema cannot say, these operations check against the model, with a 400 that
# names the field: the prompt's tokens and max_tokens against the context length, token ids
# against the vocabulary, messages against the chat template (the model's or the request's
# own Jinja), and rules across fields (best_of >= n, min_tokens <= max_tokens, echo without
# logprobs, stream_options only with stream). There a schema-valid request may get that 400;
# everything else still holds for them.
_SEMANTIC_400 = {
    "include-path-regex": "^/(v1/completions|v1/chat/completions|tokenize|detokenize)$",
    "checks": {
        "positive_data_acceptance": {
            "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]
        }
    },
}
# The schema is the app's own; the requests go to a real server of the same app with a model.
_CONFIG = SchemathesisConfig.from_dict(
    {
        "phases": {"coverage": {"enabled": COVERAGE}},
        "generation": {
            "max-examples": int(os.environ.get("SKYBROKER_SCHEMATHESIS_EXAMPLES", "15"))
        },
        "operations": [_SEMANTIC_400],
    }
)
schema = schemathesis.openapi.from_dict(
    create_app(ServerConfig(served_model_name=MODEL), _unused).openapi(), config=_CONFIG
)


@pytest.fixture(scope="module")
def engine_url(tiny_llama_dir: Path) -> Iterator[str]:
    engine = LLMEngine.from_args(EngineArgs(model=str(tiny_llama_dir), **ENGINE_KW))
    with _serve(engine, api_key=KEY) as srv:
        yield srv.url


@pytest.mark.slow
@schema.parametrize()
@settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_engine_api_conforms_to_its_schema(case: schemathesis.Case, engine_url: str) -> None:
    case.call_and_validate(base_url=engine_url, headers={"Authorization": f"Bearer {KEY}"})
