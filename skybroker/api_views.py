"""The broker API's response bodies (their JSON schemas are the OpenAPI document's)."""

from typing import Any, Literal

from pydantic import BaseModel, Field

Infra = Literal["local", "skypilot"]


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    pid: int
    deployments: int


MAP_FIELD = Field(
    default=None,
    description="the plan's geography (skybroker.plan_map): users and sites (lat/lon, null "
    "where unknown), flows (req/s from a user to a site) with their estimated RTT (ms)",
)


class PlanResponse(BaseModel):
    name: str
    infra: Infra
    plan: dict[str, Any] = Field(description="the plan: placements, $/h, solver, baselines")
    map: dict[str, Any] | None = MAP_FIELD


class DryRunResponse(BaseModel):
    """What a launch would start, validated by the provisioner; nothing was launched."""

    name: str
    infra: Infra
    dry_run: Literal[True] = True
    cost_per_hour: float = Field(description="$/h of the plan")
    replicas: list[dict[str, Any]] = Field(
        description="one row per placement: key (cloud, region, instance type, spot), GPUs, "
        "replicas, $/h each, and the provisioner's check (SkyPilot: the Task it validated)"
    )
    plan: dict[str, Any]


class ReplicaView(BaseModel):
    name: str
    status: str = Field(description="PENDING, PROVISIONING, STARTING, READY, NOT_READY, ...")
    healthy: bool = Field(description="its /health answers: the router may send to it")
    cloud: str
    region: str
    instance_type: str
    spot: bool
    url: str | None
    tls_sha256: str | None = Field(
        None, description="SHA-256 of the one certificate an https replica may show (pinned)"
    )
    price_per_hour: float
    message: str


class EventView(BaseModel):
    id: int = Field(description="increasing: a client polling for new events keeps the last")
    time: float
    kind: str
    message: str
    replica: str | None


class DeploymentView(BaseModel):
    id: str = Field(description="the deployment's id (its unique name)")
    name: str
    infra: str
    status: str = Field(description="PROVISIONING, READY, DEGRADED, FAILED or DELETING")
    message: str
    model: str | None
    endpoint: str | None = Field(description="OpenAI-compatible base URL of its router")
    cost_per_hour: float = Field(description="$/h of the replicas running now")
    planned_cost_per_hour: float | None = Field(description="$/h of the plan")
    ready_replicas: int
    desired_replicas: int
    failures: int = Field(0, description="replica failures in a row (launch errors, crashes)")
    next_launch_in_s: float | None = Field(
        None, description="seconds until the next launch while backing off after failures"
    )
    created_at: float
    updated_at: float


class ScaleDecision(BaseModel):
    time: float
    reason: str = Field(description='e.g. "rate 4.10 req/s > 2.40 served within SLO: +1 ..."')
    kind: str | None = Field(description="up | down | replan")
    load: dict[str, Any] | None = Field(description="the load it was decided on")


class AutoscaleView(BaseModel):
    history: list[list[float | int | None]] = Field(
        description="[time, desired replicas, $/h] at each change, oldest first"
    )
    decisions: list[ScaleDecision] = Field(description="the last decisions, oldest first")


class PreemptView(BaseModel):
    name: str
    replica: str
    message: str


class CooldownView(BaseModel):
    key: list[Any] = Field(description="the offering: cloud, region, instance type, spot")
    until: float = Field(description="when the plan may use it again (epoch seconds)")


class DeploymentDetail(DeploymentView):
    replicas: list[ReplicaView]
    events: list[EventView] = Field(description="recent events, oldest first")
    blocklist: list[list[Any]] = Field(description="offerings failed over from (capacity)")
    cooldowns: list[CooldownView] = Field(
        default_factory=list, description="offerings out of the plan for a while (spot)"
    )
    network_suspect_since: float | None = Field(
        None, description="since when most replicas fail their probes at once (None: they don't)"
    )
    plan: dict[str, Any]
    spec: dict[str, Any]
    autoscale: AutoscaleView | None = Field(
        default=None, description="replicas over time and the last decisions (autoscaled only)"
    )
    map: dict[str, Any] | None = MAP_FIELD


class LaunchView(DeploymentView):
    api_key: str = Field(description="the key clients of its endpoint send (Bearer)")


class KeyView(BaseModel):
    name: str
    endpoint: str | None
    api_key: str = Field(description="the key clients of its endpoint send (Bearer)")


class DeploymentList(BaseModel):
    deployments: list[DeploymentView]


class LogsView(BaseModel):
    deployment: str
    replica: int | None = Field(description="the replica index asked for (null: the first)")
    text: str = Field(description="the last lines of the replica's engine log")


class DeleteResponse(BaseModel):
    name: str
    status: str
    message: str


class OfferingView(BaseModel):
    cloud: str
    region: str
    zone: str | None
    instance_type: str
    gpu: str
    gpu_count: int
    gpu_memory_gib: float
    vcpus: float
    memory_gib: float
    price: float | None = Field(description="on-demand $/h, null where not sold on demand")
    spot_price: float | None = Field(description="spot $/h, null where not sold as spot")


class OfferingList(BaseModel):
    total: int = Field(description="offerings matching the filters (before limit/offset)")
    offerings: list[OfferingView]


class GPUView(BaseModel):
    name: str
    memory_gib: float
    memory_bandwidth_gbs: float
    fp16_tflops: float
    fp8_tflops: float | None
    interconnect: str
    interconnect_gbs: float
    vendor: str


class GPUList(BaseModel):
    gpus: list[GPUView]
