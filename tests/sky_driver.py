"""The broker's SkyPilot code run in a fresh process (so SkyPilot's client reads the temp
HOME and API server port of tests/skypilot_env.py): `python -m tests.sky_driver CALL ARG`
prints one JSON line last: {"ok": result} or {"error": class name, "message": ...}.

CALL is a provisioner method (check CLOUDS, dry_run SPEC_JSON, status NAME, statuses
NAME,NAME..., terminate NAME) or:
- `deploy SPEC_YAML TIMEOUT_S`: a Controller with the SkyPilot provisioner plans the spec,
  creates the deployment and reconciles until its first replica launch has failed (or is
  up), then prints the deployment's events and replicas and deletes it;
- `cancel NAME`: the launch of deployment NAME's replica, cancelled through the provisioner
  (`reconcile_launch`, the request id it recorded); prints the replica, its cluster and what
  was done;
- `status_as REPLICA SPOT SEEN_UP`: the replica's state from a handle holding only these
  (what a stored handle remembers);
- `adopt NAME FORGET`: a restarted broker: the store's replicas of deployment NAME are first
  marked TERMINATED when FORGET is 1 (a store that lost track of a launch), then a
  Controller adopts (cleans up, sweeps unknown clusters); prints the launch requests that
  were recorded with their SkyPilot status after adoption, the events, and deletes it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from skybroker.provision import ProvisionError, ReplicaHandle, ReplicaSpec
from skybroker.provision.skypilot import SkyPilotProvisioner


def deploy(spec_path: str, launch_timeout_s: str) -> dict[str, Any]:
    from skybroker.controller import Controller
    from skybroker.plan import make_plan
    from skybroker.spec import load_spec
    from skybroker.state import Store

    spec = load_spec(Path(spec_path))
    prov = SkyPilotProvisioner(launch_timeout_s=float(launch_timeout_s))
    store = Store()  # $SKYBROKER_HOME's database
    controller = Controller(store, {"skypilot": prov}, serve_routers=False, adopt=False)
    plan = make_plan(spec, baselines=False)
    controller.create(spec, plan)
    deadline = time.monotonic() + float(launch_timeout_s) + 300
    while time.monotonic() < deadline:
        controller.reconcile_once()
        kinds = {e.kind for e in controller.events(spec.name, limit=None)}
        if kinds & {"launch_failed", "capacity_error", "launched"}:
            break
        time.sleep(1)
    events = [asdict(e) for e in controller.events(spec.name, limit=None)]
    replicas = [asdict(r) for r in controller.replicas(spec.name, live_only=False)]
    controller.delete(spec.name)
    controller.close()
    return {"events": events, "replicas": replicas, "plan": plan.to_dict()}


def adopt(name: str, forget: str) -> dict[str, Any]:
    from sky.client import sdk

    from skybroker.controller import Controller
    from skybroker.state import ReplicaStatus, Store

    store = Store()
    if forget == "1":
        for rep in store.list_replicas(name):
            store.update_replica(rep.name, status=ReplicaStatus.TERMINATED)
    prov = SkyPilotProvisioner()
    launches = prov.home / "skypilot" / "launches"
    recorded = {p.stem: json.loads(p.read_text()) for p in launches.glob("*.json")}
    controller = Controller(store, {"skypilot": prov}, serve_routers=False, adopt=True)
    requests = {
        cluster: [r.status for r in sdk.api_status([rec["request_id"]])]
        for cluster, rec in recorded.items()
    }
    events = [asdict(e) for e in controller.events(name, limit=None)]
    left = [p.stem for p in launches.glob("*.json")]
    controller.delete(name)
    controller.close()
    return {"requests": requests, "events": events, "launch_records_left": left}


def cancel(name: str) -> dict[str, Any]:
    from skybroker.state import Store

    [rep] = Store().list_replicas(name)
    prov = SkyPilotProvisioner()
    done = prov.reconcile_launch(ReplicaHandle("skypilot", rep.name))
    return {"replica": rep.name, "cluster": prov.cluster_of(rep.name), "done": done}


def status_as(replica: str, spot: str, seen_up: str) -> str:
    info = {"spot": spot == "1", "seen_up": seen_up == "1"}
    prov = SkyPilotProvisioner()
    handle = ReplicaHandle("skypilot", replica, info=info)
    return f"{prov.status(handle).value}: {prov.failure(handle)}"


def main(call: str, *args: str) -> None:
    prov = SkyPilotProvisioner()
    try:
        if call == "deploy":
            result: Any = deploy(*args)
        elif call == "adopt":
            result = adopt(*args)
        elif call == "cancel":
            result = cancel(*args)
        elif call == "status_as":
            result = status_as(*args)
        elif call == "statuses":
            handles = [ReplicaHandle("skypilot", n) for n in args[0].split(",")]
            result = {k: v.value for k, v in prov.statuses(handles).items()}
        elif call == "check":
            result = prov.check(set(args[0].split(",")))
        elif call == "dry_run":
            result = prov.dry_run(ReplicaSpec(**json.loads(args[0])))
        elif call == "status":
            result = prov.status(ReplicaHandle("skypilot", args[0])).value
        elif call == "terminate":
            result = prov.terminate(ReplicaHandle("skypilot", args[0]))
        else:
            raise SystemExit(f"unknown call {call!r}")
    except ProvisionError as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        return
    print(json.dumps({"ok": result}, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
