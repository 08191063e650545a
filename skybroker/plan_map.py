"""A plan as a map: where its users are, where it serves them from, and the flows between.

`plan_map(spec, plan, catalog)` locates each user region (an area, a cloud region, or the
spec's lat/lon: `skybroker.plan_problem.user_location`) and each placement's region (the
catalog's `regions.csv`), and lists the flows of the plan's `serves` (req/s from a user to a
site) with their estimated RTT (`skybroker.catalog.geo.rtt_ms`). What has no location (users
"anywhere", this machine for `infra: local`) keeps lat/lon null: the dashboard lists it
beside the map.
"""

from __future__ import annotations

from typing import Any

from skybroker.catalog.geo import rtt_ms
from skybroker.catalog.schema import Catalog
from skybroker.plan_problem import user_location
from skybroker.spec import DeploymentSpec, SpecError

LatLon = tuple[float, float]


def _users(spec: DeploymentSpec, catalog: Catalog) -> dict[str, dict[str, Any]]:
    out = {}
    for name, share in spec.workload.user_shares().items():
        ur = spec.workload.users.get(name)
        try:
            loc = user_location(name, ur.lat if ur else None, ur.lon if ur else None, catalog)
        except SpecError:
            loc = None
        out[name] = {"name": name, "share": round(share, 4),
                     "rate": round(share * spec.workload.rate, 4),
                     "lat": loc[0] if loc else None, "lon": loc[1] if loc else None}  # fmt: skip
    return out


def _site(p: dict[str, Any], catalog: Catalog) -> dict[str, Any]:
    r = catalog.region_of(p["cloud"], p["region"])
    return {
        "cloud": p["cloud"],
        "region": p["region"],
        "city": r.city if r else ("this machine" if p["cloud"] == "local" else None),
        "country": r.country if r else None,
        "lat": r.lat if r else None,
        "lon": r.lon if r else None,
        "replicas": 0,
        "cost_per_hour": 0.0,
        "instances": [],
    }


def _rtt(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    if None in (a["lat"], a["lon"], b["lat"], b["lon"]):
        return None
    return round(rtt_ms((a["lat"], a["lon"]), (b["lat"], b["lon"])), 1)


def plan_map(spec: DeploymentSpec, plan: dict[str, Any], catalog: Catalog) -> dict[str, Any]:
    """{users, sites, flows, max_rtt_ms} of `plan` (a `Plan.to_dict()`) for `spec`."""
    users = _users(spec, catalog)
    sites: dict[str, dict[str, Any]] = {}
    flows: dict[tuple[str, str], dict[str, Any]] = {}
    for p in plan.get("placements", []):
        key = f"{p['cloud']}/{p['region']}"
        site = sites.setdefault(key, _site(p, catalog))
        site["replicas"] += p["replicas"]
        site["cost_per_hour"] = round(site["cost_per_hour"] + p["cost_per_hour"], 4)
        site["instances"].append(f"{p['replicas']} x {p['instance_type']}")
        for user, rps in p.get("serves", {}).items():
            flow = flows.setdefault((user, key), {"user": user, "site": key, "rate": 0.0})
            flow["rate"] = round(flow["rate"] + rps, 4)
    for flow in flows.values():
        user = users.get(flow["user"], {"lat": None, "lon": None})
        flow["rtt_ms"] = _rtt(user, sites[flow["site"]])
    return {
        "users": list(users.values()),
        "sites": [{"id": k, **v} for k, v in sites.items()],
        "flows": list(flows.values()),
        "max_rtt_ms": spec.slo.max_rtt_ms,
    }
