"""A dry run: what `create` would launch, each replica validated by its provisioner.

The provisioner's checks run first (an extra, credentials), then each placement's replica is
built as a launch would build it and passed to the provisioner's `dry_run` when it has one
(SkyPilot validates the Task: the instance type exists in that region, with those GPUs, on
that market). Nothing is recorded and nothing launches.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor
from typing import Any

from skybroker.provision import Provisioner
from skybroker.state import Deployment, Replica, ReplicaStatus
from skybroker.targets import replica_spec, targets_from_plan


def dry_run(
    prov: Provisioner, spec: Any, plan: Any, router_host: str, pool: Executor
) -> list[dict[str, Any]]:
    """Each target of `plan`, with `validated` and what the provisioner's check returned.
    Raises ProvisionError."""
    targets = targets_from_plan(plan)
    check = getattr(prov, "check", None)
    if check is not None:
        check({t["key"][0] for t in targets})
    now = time.time()
    dep = Deployment(
        name=spec.name,
        infra=spec.infra,
        status="DRY_RUN",
        spec=spec.model_dump(mode="json"),
        plan=plan.to_dict(),
        targets=targets,
        blocklist=[],
        router_host=router_host,
        router_port=None,
        message="",
        created_at=now,
        updated_at=now,
    )
    replicas = []
    for i, t in enumerate(targets):
        cloud, region, instance_type, spot = t["key"]
        rep = Replica(
            id=i,
            deployment=spec.name,
            name=f"{spec.name}-dry{i}",
            target=i,
            cloud=cloud,
            region=region,
            instance_type=instance_type,
            spot=bool(spot),
            status=ReplicaStatus.PENDING,
            url=None,
            handle=None,
            failures=0,
            message="",
            created_at=now,
            updated_at=now,
            launched_at=None,
            ready_at=None,
        )
        replicas.append(replica_spec(dep, rep))
    validate = getattr(prov, "dry_run", None)
    checked = list(pool.map(validate, replicas)) if validate else [{}] * len(targets)
    return [
        {**t, "validated": validate is not None, **c} for t, c in zip(targets, checked, strict=True)
    ]
