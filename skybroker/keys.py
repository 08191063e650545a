"""The broker's keys: one secret on disk, every other key derived from it, none stored.

`$SKYBROKER_HOME/secret` (mode 0600, made on first use) holds 32 random bytes. Each key is an
HMAC of that secret over what it is for and whom, so the state store never holds a key and a
restarted broker computes the same ones:

- `endpoint_api_key(name, created_at)`: what clients of a deployment's endpoint send
  (`Authorization: Bearer ...`); the creation time makes a re-created name a new key;
- `replica_api_key(replica, created_at)`: what the router and the controller send to one
  engine replica; the replica row's creation time makes every replica, a replacement
  included, a new key, so a key seen on one replica opens no other;
- `router_admin_key(name)`: what the controller sends to the router's admin routes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from skybroker.state import default_home


def broker_secret() -> bytes:
    """The broker's secret, created (0600) on first use."""
    path = default_home() / "secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another broker wrote it first
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def _derive(*parts: str) -> str:
    return hmac.new(broker_secret(), "\0".join(parts).encode(), hashlib.sha256).hexdigest()


def replica_api_key(replica: str, created_at: float) -> str:
    """The API key of one engine replica (local and cloud), the row `replica` made at
    `created_at`."""
    return _derive("replica", replica, repr(float(created_at)))


def endpoint_api_key(deployment: str, created_at: float) -> str:
    """The key clients of a deployment's endpoint use: `sk-` and 48 hex digits."""
    return "sk-" + _derive("endpoint", deployment, repr(float(created_at)))[:48]


def router_admin_key(deployment: str) -> str:
    """The key of a deployment router's admin routes (the controller's side only)."""
    return _derive("router-admin", deployment)


def same_key(given: str, expected: str) -> bool:
    """Constant-time comparison of two keys."""
    return hmac.compare_digest(given.encode(), expected.encode())
