"""The broker's REST API (FastAPI): plans, deployments and the catalog over HTTP.

`create_app(controller, token=None)` builds the app the broker server hosts; the CLI's
launch/status/down/logs go through it (skybroker.client), so CLI and API cannot drift apart.

Every error has one JSON shape, `{"error": {"code", "message", "field", "errors": [...]}}`,
where `field` names the request field at fault (e.g. `slo.ttft_ms`, `max_price`) when there is
one. With a token every /v1 route needs `Authorization: Bearer <token>` (compared in constant
time); /health and the OpenAPI docs stay open. A spec may name files (`model.path`,
`workload.trace`, `engine.profiles`) only under the directories the server allows, unless the
request carries the owner key that the local CLI reads from $SKYBROKER_HOME.
"""

import functools
import hmac
import json
import logging
import math
import re
from dataclasses import asdict
from pathlib import Path as PathLib
from typing import Annotated, Any

import yaml
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from skybroker import __version__
from skybroker.api_errors import (
    ERROR_RESPONSES,
    ApiError,
    ErrorResponse,
    FieldError,
    auth_dependency,
    install_error_handlers,
    validation_errors,
)
from skybroker.api_views import (
    DeleteResponse,
    DeploymentDetail,
    DeploymentList,
    DeploymentView,
    DryRunResponse,
    EventView,
    GPUList,
    GPUView,
    Health,
    Infra,
    KeyView,
    LaunchView,
    LogsView,
    OfferingList,
    OfferingView,
    PlanResponse,
    PreemptView,
    ReplicaView,
)
from skybroker.dashboard import add_dashboard

log = logging.getLogger("skybroker.api")

MAX_SPEC_BYTES = 1 << 20
OWNER_HEADER = "X-Skybroker-Owner"


# ---------------------------------------------------------------- spec bodies


SPEC_BODY = {
    "requestBody": {
        "required": True,
        "description": "a deployment spec (see `skybroker.spec`), as JSON or YAML",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/yaml": {"schema": {"type": "string"}},
        },
    }
}


PROBE_SCAN_LINES = 100_000  # lines read to find `tail` that are not /health probes
_PROBE = re.compile(r'"(GET|HEAD) /health[ ?]')


def without_probes(text: str, tail: int) -> str:
    """The last `tail` lines of a replica log that are not the router's /health probes."""
    kept = [line for line in text.splitlines() if not _PROBE.search(line)]
    return "\n".join(kept[-tail:]) + ("\n" if kept else "")


def _finite(x: Any) -> Any:
    """NaN/inf are not JSON: make them null (recursively)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


async def _spec_data(request: Request) -> dict[str, Any]:
    """The request body as a mapping: JSON when the content type says so, YAML otherwise."""
    body = await request.body()
    if len(body) > MAX_SPEC_BYTES:
        raise ApiError(413, "too_large", f"the spec is over {MAX_SPEC_BYTES} bytes")
    if not body.strip():
        raise ApiError(400, "invalid_spec", "the request body is empty: send a deployment spec")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_spec", "the spec is not UTF-8 text") from None
    try:
        data = json.loads(text) if ctype.endswith("json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if ctype.endswith("json") else "YAML"
        raise ApiError(400, "invalid_spec", f"the spec is not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(
            400,
            "invalid_spec",
            f"the spec must be a mapping (name:, model:, workload: ...), not {type(data).__name__}",
        )
    return data


def _parse_spec(data: dict[str, Any], infra: str | None) -> Any:  # -> DeploymentSpec
    from pydantic import ValidationError

    from skybroker.spec import DeploymentSpec, SpecError, parse_spec

    if infra is not None:
        data = {**data, "infra": infra}
    try:
        return parse_spec(data, "(request body)")
    except SpecError as e:
        try:  # validate again for the structured locations of what failed
            DeploymentSpec.model_validate(data)
            errors: list[FieldError] = []
        except ValidationError as ve:
            errors = validation_errors(list(ve.errors()))
        except Exception:  # a validator tripping on odd input: keep SpecError's message
            errors = []
        field = errors[0].field if errors else None
        raise ApiError(422, "invalid_spec", str(e), field, errors) from None


def _check_spec(spec: Any, allowed: list[PathLib] | None, launch: bool = False) -> Any:
    """`skybroker.validate.check_spec` with the server's file policy; 422 naming the fields."""
    from skybroker.spec import SpecError
    from skybroker.validate import check_spec

    try:
        return check_spec(spec, _catalog(), allowed=allowed, launch=launch,
                          source="(request body)")  # fmt: skip
    except SpecError as e:
        errors = [FieldError(field=f, message=m) for f, m in e.problems]
        field = errors[0].field if errors else None
        raise ApiError(422, "invalid_spec", str(e), field, errors) from None


def _make_plan(spec: Any, blocklist: frozenset = frozenset(), warm: Any = None) -> Any:
    """-> Plan; `warm`: an autoscaler's re-plan of what runs (no baselines: nobody reads them)."""
    from skybroker.plan import InfeasibleError, make_plan
    from skybroker.spec import SpecError

    try:
        return make_plan(spec, _catalog(), blocklist=blocklist, warm=warm, baselines=warm is None)
    except InfeasibleError as e:
        raise ApiError(422, "infeasible", str(e)) from None
    except SpecError as e:
        raise ApiError(422, "invalid_spec", str(e)) from None


# ---------------------------------------------------------------- deployments


def _describe(
    controller: Any, name: str, events: int = 20, with_map: bool = True
) -> DeploymentDetail:
    """The controller's description of one deployment, as the API's model (404 if none)."""
    d = controller.describe(name)
    dep = controller.get(name)
    if d is None or dep is None:
        raise ApiError(404, "not_found", f"no deployment named {name!r}", "name")
    replicas = [ReplicaView(**r, healthy=r["status"] == "READY") for r in d["replicas"]]
    return DeploymentDetail(
        **{k: v for k, v in d.items() if k not in ("replicas", "events", "blocklist")},
        id=dep.name,
        created_at=dep.created_at,
        updated_at=dep.updated_at,
        replicas=replicas,
        events=[EventView(**_finite(asdict(e))) for e in controller.events(name, limit=events)]
        if events
        else [],
        blocklist=d["blocklist"],
        plan=_finite(dep.plan),
        spec=dep.spec,
        map=_map(dep.spec, dep.plan) if with_map else None,
    )


def _map(spec: Any, plan: dict[str, Any]) -> dict[str, Any] | None:
    """`skybroker.plan_map` of a spec (parsed, or as stored) and its plan."""
    from skybroker.plan_map import plan_map
    from skybroker.spec import SpecError, parse_spec

    if isinstance(spec, dict):
        try:
            spec = parse_spec(spec)
        except SpecError:
            return None
    return _finite(plan_map(spec, plan, _catalog()))


@functools.cache
def _catalog() -> Any:  # -> Catalog
    """The bundled catalog, loaded once per process on first use."""
    from skybroker.catalog import load_catalog

    return load_catalog()


async def _dry_run(controller: Any, spec: Any) -> JSONResponse:
    from skybroker.provision import ProvisionError

    plan = await run_in_threadpool(_make_plan, spec)
    try:
        replicas = await run_in_threadpool(controller.dry_run, spec, plan)
    except ProvisionError as e:
        raise ApiError(502, "provisioner_error", str(e)) from None
    answer = DryRunResponse(
        name=spec.name,
        infra=spec.infra,
        cost_per_hour=sum(r["replicas"] * r["price_per_hour"] for r in replicas),
        replicas=_finite(replicas),
        plan=_finite(plan.to_dict()),
    )
    return JSONResponse(answer.model_dump(mode="json"), status_code=200)


def _taken(name: str) -> str:
    return f"a deployment named {name!r} exists: `skybroker down {name}` first, or rename"


def _summary(detail: DeploymentDetail) -> DeploymentView:
    return DeploymentView(**detail.model_dump(include=set(DeploymentView.model_fields)))


# ---------------------------------------------------------------- the app


def _file_policy(allowed: list[PathLib], owner_key: str | None) -> Any:
    """A dependency: which files this request's spec may name. A request carrying the owner
    key (OWNER_HEADER; only the user who started the server can read it) names any file, as
    the CLI does on that user's own disk; every other one only files under `allowed`."""
    expected = owner_key.encode() if owner_key else None

    async def policy(request: Request) -> list[PathLib] | None:
        given = request.headers.get(OWNER_HEADER, "").encode()
        if expected is not None and given and hmac.compare_digest(given, expected):
            return None
        return allowed

    return policy


def _owner_only(owner_key: str | None) -> Any:
    """A dependency: 403 unless the request carries the owner key (OWNER_HEADER)."""
    expected = owner_key.encode() if owner_key else None

    async def owner(request: Request) -> None:
        given = request.headers.get(OWNER_HEADER, "").encode()
        if expected is None or not given or not hmac.compare_digest(given, expected):
            raise ApiError(403, "forbidden", f"this route wants the owner key ({OWNER_HEADER})")

    return owner


def create_app(
    controller: Any,
    token: str | None = None,
    *,
    allowed_paths: list[PathLib] | None = None,
    owner_key: str | None = None,
) -> FastAPI:
    """The broker's FastAPI app over `controller` (a skybroker.controller.Controller).
    Specs it receives may name files under `allowed_paths` only (any file with `owner_key`).
    Its /docs page loads Swagger UI from the package (no CDN)."""
    from fastapi_offline import FastAPIOffline

    app = FastAPIOffline(
        title="skybroker",
        version=__version__,
        description="Plan, launch and manage LLM inference deployments across clouds.",
        responses=ERROR_RESPONSES,
    )
    app.state.controller = controller
    install_error_handlers(app)
    auth = [Depends(auth_dependency(token))]
    files = Depends(_file_policy(list(allowed_paths or []), owner_key))
    add_dashboard(app, controller, auth)

    @app.get("/health", tags=["server"])
    def health() -> Health:
        """Liveness of the broker server (open without a token)."""
        import os

        return Health(
            status="ok",
            version=__version__,
            pid=os.getpid(),
            deployments=len(controller.list()),
        )

    @app.post(
        "/v1/plans",
        tags=["plans"],
        dependencies=auth,
        openapi_extra=SPEC_BODY,
        responses={413: {"model": ErrorResponse}},
    )
    async def create_plan(
        request: Request,
        infra: Annotated[Infra | None, Query()] = None,
        allowed: list[PathLib] | None = files,
    ) -> PlanResponse:
        """Solve the cheapest placement meeting the spec's SLO, with baselines."""
        spec = _parse_spec(await _spec_data(request), infra)
        spec = await run_in_threadpool(_check_spec, spec, allowed)
        plan = (await run_in_threadpool(_make_plan, spec)).to_dict()
        return PlanResponse(
            name=spec.name, infra=spec.infra, plan=_finite(plan), map=_map(spec, plan)
        )

    @app.post(
        "/v1/deployments",
        tags=["deployments"],
        status_code=202,
        dependencies=auth,
        openapi_extra=SPEC_BODY,
        responses={
            409: {"model": ErrorResponse, "description": "the name is taken"},
            413: {"model": ErrorResponse},
            502: {"model": ErrorResponse, "description": "the provisioner failed"},
        },
    )
    async def create_deployment(
        request: Request,
        infra: Annotated[Infra | None, Query()] = None,
        allowed: list[PathLib] | None = files,
        dry_run: Annotated[
            bool, Query(description="plan and validate every replica's launch; launch nothing")
        ] = False,
    ) -> LaunchView | DryRunResponse:
        """Plan and launch; answers at once, progress shows in GET /v1/deployments/{name}.
        With dry_run, answers what would be launched where at what $/h (200)."""
        from skybroker.provision import ProvisionError
        from skybroker.state import StateError

        spec = _parse_spec(await _spec_data(request), infra)
        spec = await run_in_threadpool(_check_spec, spec, allowed, True)
        if dry_run:
            return await _dry_run(controller, spec)
        if controller.get(spec.name) is not None:
            raise ApiError(409, "conflict", _taken(spec.name), "name")
        plan = await run_in_threadpool(_make_plan, spec)
        try:
            await run_in_threadpool(controller.create, spec, plan)
        except StateError:
            raise ApiError(409, "conflict", _taken(spec.name), "name") from None
        except ProvisionError as e:
            raise ApiError(502, "provisioner_error", str(e)) from None
        view = _summary(_describe(controller, spec.name, events=0, with_map=False))
        return LaunchView(**view.model_dump(), api_key=controller.api_key(spec.name))

    @app.get("/v1/deployments", tags=["deployments"], dependencies=auth)
    def list_deployments() -> DeploymentList:
        """All deployments with their status, endpoint and $/h."""
        views = [
            _summary(_describe(controller, d.name, events=0, with_map=False))
            for d in controller.list()
        ]
        return DeploymentList(deployments=views)

    @app.get(
        "/v1/deployments/{name}",
        tags=["deployments"],
        dependencies=auth,
        responses={404: {"model": ErrorResponse}},
    )
    def get_deployment(
        name: Annotated[str, Path()],
        events: Annotated[int, Query(ge=0, le=1000, description="how many recent events")] = 20,
    ) -> DeploymentDetail:
        """One deployment: replicas and their health, endpoint, $/h, recent events."""
        return _describe(controller, name, events)

    @app.get(
        "/v1/deployments/{name}/key",
        tags=["deployments"],
        dependencies=auth,
        responses={404: {"model": ErrorResponse}},
    )
    def deployment_key(name: Annotated[str, Path()]) -> KeyView:
        """The key clients of the deployment's endpoint send (`Authorization: Bearer ...`)."""
        dep, key = controller.get(name), controller.api_key(name)
        if dep is None or key is None:
            raise ApiError(404, "not_found", f"no deployment named {name!r}", "name")
        return KeyView(name=name, endpoint=dep.endpoint, api_key=key)

    @app.delete(
        "/v1/deployments/{name}",
        tags=["deployments"],
        dependencies=auth,
        responses={404: {"model": ErrorResponse}, 502: {"model": ErrorResponse}},
    )
    async def delete_deployment(name: Annotated[str, Path()]) -> DeleteResponse:
        """Tear a deployment down (replicas, router, state); 404 if there is none."""
        from skybroker.provision import ProvisionError

        try:
            existed = await run_in_threadpool(controller.delete, name)
        except ProvisionError as e:
            raise ApiError(502, "provisioner_error", f"teardown of {name!r} failed: {e}") from None
        if not existed:
            raise ApiError(404, "not_found", f"no deployment named {name!r}", "name")
        return DeleteResponse(name=name, status="DELETED", message="torn down")

    @app.post(
        "/v1/deployments/{name}/replicas/{replica}/preempt",
        tags=["deployments"],
        dependencies=[*auth, Depends(_owner_only(owner_key))],
        responses={403: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                   409: {"model": ErrorResponse}},
    )  # fmt: skip
    async def preempt_replica(
        name: Annotated[str, Path()], replica: Annotated[str, Path()]
    ) -> PreemptView:
        """Take a replica away as a spot reclaim does (local infra; for tests and demos):
        the controller replaces it without counting a failure. Wants the owner key."""
        from skybroker.provision import ProvisionError
        from skybroker.state import StateError

        try:
            await run_in_threadpool(controller.preempt, name, replica)
        except StateError as e:
            raise ApiError(404, "not_found", str(e), "replica") from None
        except ProvisionError as e:
            raise ApiError(409, "unsupported", str(e)) from None
        return PreemptView(name=name, replica=replica, message="preempted; it will be replaced")

    @app.get(
        "/v1/deployments/{name}/logs",
        tags=["deployments"],
        dependencies=auth,
        responses={404: {"model": ErrorResponse}, 502: {"model": ErrorResponse}},
    )
    def deployment_logs(
        name: Annotated[str, Path()],
        replica: Annotated[
            int | None, Query(ge=0, description="replica index (default: the first live one)")
        ] = None,
        tail: Annotated[int, Query(ge=1, le=100_000)] = 200,
        probes: Annotated[
            bool, Query(description="keep the /health probe lines (left out by default)")
        ] = False,
    ) -> LogsView:
        """The last `tail` lines of one replica's engine log (without /health probes)."""
        from skybroker.provision import ProvisionError
        from skybroker.state import StateError

        if controller.get(name) is None:
            raise ApiError(404, "not_found", f"no deployment named {name!r}", "name")
        try:
            text = controller.logs(name, replica, tail=tail if probes else PROBE_SCAN_LINES)
            if not probes:
                text = without_probes(text, tail)
        except StateError as e:
            raise ApiError(404, "not_found", str(e), "replica") from None
        except ProvisionError as e:
            raise ApiError(502, "provisioner_error", f"cannot read the log: {e}") from None
        return LogsView(deployment=name, replica=replica, text=text)

    @app.get("/v1/catalog/offerings", tags=["catalog"], dependencies=auth)
    def offerings(
        gpu: Annotated[str | None, Query(description="GPU kind(s), e.g. H100 or L4,A10G")] = None,
        cloud: Annotated[str | None, Query(description="cloud(s), comma-separated")] = None,
        region: Annotated[str | None, Query(description="region(s), comma-separated")] = None,
        spot: Annotated[
            bool | None, Query(description="true: sold as spot; false: sold on demand")
        ] = None,
        max_price: Annotated[
            float | None, Query(ge=0, description="$/h at most (on the chosen market)")
        ] = None,
        min_gpu_memory_gib: Annotated[
            float | None, Query(ge=0, description="GPU memory of the whole instance")
        ] = None,
        min_gpu_count: Annotated[int | None, Query(ge=1)] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> OfferingList:
        """Catalog offerings matching the filters, cheapest first."""
        try:
            _catalog().check_names(gpu=gpu, cloud=cloud)
            rows = _catalog().query(
                gpu=gpu,
                cloud=cloud,
                region=region,
                spot=spot,
                max_price=max_price,
                min_gpu_memory_gib=min_gpu_memory_gib,
                min_gpu_count=min_gpu_count,
            )
        except ValueError as e:
            raise ApiError(400, "invalid_request", str(e)) from None
        page = rows[offset : offset + limit]
        return OfferingList(
            total=len(rows), offerings=[OfferingView(**_finite(asdict(o))) for o in page]
        )

    @app.get("/v1/catalog/gpus", tags=["catalog"], dependencies=auth)
    def gpus() -> GPUList:
        """GPU kinds and their spec-sheet figures."""
        return GPUList(gpus=[GPUView(**_finite(asdict(g))) for g in _catalog().gpus.values()])

    return app
