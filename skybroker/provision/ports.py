"""Where SkyPilot can expose a replica's engine port, and what it leaves open.

Read from SkyPilot 0.14's provisioners (`sky/provision/<cloud>/instance.py`, `open_ports`
and `cleanup_ports`):
- Lambda `us-south-1`: `open_ports` skips the region with only a warning (Lambda has no
  firewall rules there), so a replica planned there can never be reached: the planner
  leaves those offerings out (`port_unreachable`).
- Lambda elsewhere: firewall rules are account-wide; `open_ports` adds a rule open to
  0.0.0.0/0 for the port, for every instance of the account, and `cleanup_ports` leaves it
  after the cluster goes down (`left_open`, shown by the plan and `status`).
"""

from __future__ import annotations

from collections.abc import Iterable

NO_PORTS: dict[tuple[str, str], str] = {
    ("lambda", "us-south-1"): "SkyPilot cannot open ports in Lambda us-south-1 "
    "(no firewall rules there), so its replicas could not be reached",
}
LEFT_OPEN: dict[str, str] = {
    "lambda": "Lambda firewall rules are account-wide: the engine ports are open to 0.0.0.0/0 "
    "on every instance of the account and stay open after the replicas go down "
    "(remove them in Lambda's console: Firewall)",
}


def port_unreachable(cloud: str, region: str) -> str | None:
    """Why SkyPilot cannot expose a port on this cloud and region, None when it can."""
    return NO_PORTS.get((cloud.lower(), region.lower()))


def left_open(clouds: Iterable[str]) -> list[str]:
    """What stays open on these clouds beyond the broker's replicas, one line per cloud."""
    return [LEFT_OPEN[c] for c in sorted({c.lower() for c in clouds}) if c in LEFT_OPEN]
