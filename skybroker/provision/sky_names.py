"""SkyPilot cluster names and ownership: which clusters belong to this broker, and to which
replica.

A cluster is `sb-<broker id>-<replica slug>-<hash>`: the broker id (5 characters, random,
kept in `$SKYBROKER_HOME/broker-id`) keeps two brokers with separate stores apart; the hash
(7 base32 characters of the full replica name's SHA-256) keeps every replica of one broker
apart however long or alike the names; the slug (a prefix of the replica name) is for people.
The name is at most `CLUSTER_NAME_MAX` characters, so SkyPilot's name on the cloud (the name
plus `-` and its 8-character user hash, `common_utils.make_cluster_name_on_cloud`) fits
unchanged in the shortest limit of the clouds the catalog plans on (GCP's 35,
`sky/clouds/gcp.py` `_MAX_CLUSTER_NAME_LEN_LIMIT`). Clusters also carry the broker id and
replica name hash as resource labels, checked before a cluster is reused or downed.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from pathlib import Path
from typing import Any

CLUSTER_PREFIX = "sb-"
CLUSTER_NAME_MAX = 26  # 35 (GCP) - 9 (SkyPilot's "-<user hash>")
SKY_USER_HASH_LEN = 9
BROKER_LABEL = "skybroker-broker"
REPLICA_LABEL = "skybroker-replica"
_ID_FILE = "broker-id"
_ID_LEN, _HASH_LEN = 5, 7


def _b32(data: bytes, n: int) -> str:
    return base64.b32encode(data).decode().lower()[:n]


def broker_id(home: Path) -> str:
    """This broker's id, created once under `home` (lowercase letters and digits 2-7)."""
    path = home / _ID_FILE
    try:
        found = path.read_text().strip()
    except FileNotFoundError:
        found = ""
    if re.fullmatch(f"[a-z2-7]{{{_ID_LEN}}}", found):
        return found
    home.mkdir(parents=True, exist_ok=True)
    new = _b32(secrets.token_bytes(8), _ID_LEN)
    path.write_text(new + "\n")
    return new


def replica_hash(replica_name: str) -> str:
    return _b32(hashlib.sha256(replica_name.encode()).digest(), _HASH_LEN)


def broker_prefix(broker: str) -> str:
    """The start of every cluster name of broker `broker`."""
    return f"{CLUSTER_PREFIX}{broker}-"


def cluster_name(replica_name: str, broker: str) -> str:
    """The SkyPilot cluster of replica `replica_name` of broker `broker`: unique per broker
    and full replica name, [a-z0-9-], starts with a letter, <= CLUSTER_NAME_MAX characters."""
    head, tail = broker_prefix(broker), "-" + replica_hash(replica_name)
    slug = re.sub(r"[^a-z0-9]+", "-", replica_name.lower()).strip("-")
    slug = slug[: CLUSTER_NAME_MAX - len(head) - len(tail)].strip("-")
    return f"{head}{slug}{tail}" if slug else f"{head}{tail[1:]}"


def labels(replica_name: str, broker: str) -> dict[str, str]:
    """The resource labels (cloud tags) that mark a cluster as this broker's replica."""
    return {BROKER_LABEL: broker, REPLICA_LABEL: replica_hash(replica_name)}


def record_labels(record: Any) -> dict[str, str]:
    """The labels of a `sky.status` record (its own field, else the launched resources')."""
    found = field_of(record, "labels")
    if not found:
        handle = field_of(record, "handle")
        resources = getattr(handle, "launched_resources", None)
        found = getattr(resources, "labels", None)
    return dict(found or {})


def owner_of(record: Any) -> tuple[str | None, str | None]:
    """(broker id, replica hash) a cluster's labels name; None where a label is missing."""
    found = record_labels(record)
    return found.get(BROKER_LABEL), found.get(REPLICA_LABEL)


def field_of(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, dict) else getattr(record, name, None)
