"""Property-based run of schemathesis against the served OpenAPI schema.

Checks that no generated request (valid or not) gets a 500, an undocumented status code, a
wrong content type, or a body that breaks the response schema. Bounded: few examples per
operation (the plan endpoint's solve is the slow one).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from skybroker.api import create_app
from skybroker.controller import Controller
from skybroker.state import Store

COVERAGE = os.environ.get("SKYBROKER_SCHEMATHESIS_COVERAGE") == "1"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


_STATE_DIR = tempfile.TemporaryDirectory(prefix="skybroker-schemathesis-")
_OLD_HOME = os.environ.get("SKYBROKER_HOME")
os.environ["SKYBROKER_HOME"] = str(Path(_STATE_DIR.name) / "home")  # restored below
_STORE = Store(f"sqlite:///{Path(_STATE_DIR.name) / 'state.db'}")
_CONTROLLER = Controller(_STORE)
# The coverage phase enumerates boundary values without a bound; fuzzing is capped below.
_CONFIG = SchemathesisConfig.from_dict(
    {"phases": {"coverage": {"enabled": COVERAGE}}, "generation": {"max-examples": 10}}
)
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_CONTROLLER), config=_CONFIG)


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Iterator[None]:
    yield
    for dep in _CONTROLLER.list():  # replicas and routers outlive a closed controller
        _CONTROLLER.delete(dep.name)
    _CONTROLLER.close()
    _STORE.close()
    if _OLD_HOME is None:
        os.environ.pop("SKYBROKER_HOME", None)
    else:
        os.environ["SKYBROKER_HOME"] = _OLD_HOME
    _STATE_DIR.cleanup()


@pytest.mark.slow
@schema.parametrize()
@settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)
