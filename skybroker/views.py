"""JSON-able views of deployments, as the REST API and the CLI show them."""

from __future__ import annotations

import time
from typing import Any

from skybroker.health import FailureRun
from skybroker.provision.ports import left_open
from skybroker.state import Deployment, Event, Replica, ReplicaStatus
from skybroker.tls import fingerprint

# Replicas that cost money now (running, or finishing their in-flight requests).
BILLED = (
    ReplicaStatus.STARTING,
    ReplicaStatus.READY,
    ReplicaStatus.NOT_READY,
    ReplicaStatus.DRAINING,
)


def deployment_view(
    dep: Deployment, reps: list[Replica], events: list[Event], run: FailureRun
) -> dict[str, Any]:
    """One deployment: replicas, health, $/h, endpoint, failures in a row, recent events."""
    price = {i: t["price_per_hour"] for i, t in enumerate(dep.targets)}
    billed = [r for r in reps if r.status in BILLED]
    wait = run.next_launch_at - time.time()
    model = dep.spec.get("model", {})
    return {
        "name": dep.name,
        "infra": dep.infra,
        "status": dep.status,
        "message": dep.message,
        "endpoint": dep.endpoint,
        "model": model.get("name") or model.get("path"),
        "cost_per_hour": round(sum(price.get(r.target, 0.0) for r in billed), 4),
        "planned_cost_per_hour": dep.plan.get("cost_per_hour"),
        "desired_replicas": sum(t["replicas"] for t in dep.targets),
        "ready_replicas": sum(r.status == ReplicaStatus.READY for r in reps),
        "replicas": [
            {
                "name": r.name,
                "cloud": r.cloud,
                "region": r.region,
                "instance_type": r.instance_type,
                "spot": r.spot,
                "status": r.status,
                "url": r.url,
                "tls_sha256": _pin(r),
                "price_per_hour": price.get(r.target, 0.0),
                "message": r.message,
            }
            for r in reps
        ],
        "blocklist": [list(k) for k in dep.blocklist],
        # firewall rules SkyPilot opened beyond the replicas (account-wide ones stay open
        # after the replicas go down)
        "left_open": left_open(r.cloud for r in reps),
        "failures": run.count,  # in a row (see skybroker.health)
        "next_launch_in_s": round(wait, 1) if run.count and wait > 0 else None,
        "events": [
            {"time": e.time, "kind": e.kind, "replica": e.replica, "message": e.message}
            for e in events
        ],
    }


def _pin(rep: Replica) -> str | None:
    cert = (rep.handle or {}).get("info", {}).get("tls_cert")
    return fingerprint(cert) if cert else None
