"""SkyPilot's client SDK as the provisioner uses it: the calls it needs (checked against the
installed SkyPilot), and SkyPilot's exceptions mapped to the broker's own errors
(`CapacityError` feeds failover). `sky` is imported lazily: the broker runs without it.
"""

from __future__ import annotations

import inspect
from typing import Any

from skybroker.provision import (
    CapacityError,
    CredentialsError,
    MissingExtraError,
    NoCloudAccessError,
    ProvisionError,
    ReplicaSpec,
)

# The SkyPilot releases this provisioner is tested with (pyproject's `cloud` extra pins the same).
SKYPILOT_RANGE = ">=0.14.1,<0.15"
# The SDK calls the provisioner makes, with the keyword arguments it passes.
SDK_CALLS: dict[str, tuple[str, ...]] = {
    "check": ("infra_list", "verbose"),
    "launch": ("task", "cluster_name", "retry_until_up", "idle_minutes_to_autostop", "dryrun"),
    "stream_and_get": ("request_id", "output_stream"),
    "get": ("request_id",),
    "status": ("cluster_names", "refresh"),
    "down": ("cluster_name",),
    "endpoints": ("cluster", "port"),
    "tail_logs": ("cluster_name", "job_id", "follow", "tail", "output_stream"),
    "api_cancel": ("request_ids", "silent"),
    "api_status": ("request_ids",),
    "job_status": ("cluster_name", "job_ids"),
}


def import_sdk() -> Any:
    """SkyPilot's client SDK module, or a MissingExtraError that says how to install it."""
    try:
        from sky.client import sdk
    except ImportError as e:
        raise MissingExtraError(
            f"SkyPilot is not installed ({e}); infra 'skypilot' needs it: "
            "pip install 'skybroker[cloud]'"
        ) from e
    return sdk


def import_sky() -> Any:
    """The `sky` package (Task, Resources, exceptions), or a MissingExtraError."""
    import_sdk()
    import sky

    return sky


def missing_sdk_calls(sdk: Any) -> list[str]:
    """What the provisioner needs that this SDK lacks: `name` or `name(arg)`, [] when none."""
    missing = []
    for name, params in SDK_CALLS.items():
        fn = getattr(sdk, name, None)
        if not callable(fn) or inspect.ismodule(fn):
            missing.append(name)
            continue
        have = inspect.signature(fn).parameters
        missing += [f"{name}({p})" for p in params if p not in have]
    return missing


def check_sdk(sdk: Any) -> None:
    """Raise a ProvisionError naming the missing calls if this SkyPilot cannot serve us."""
    missing = missing_sdk_calls(sdk)
    if missing:
        version = getattr(import_sky(), "__version__", "?")
        raise ProvisionError(
            f"the installed SkyPilot {version} lacks {', '.join(missing)} in sky.client.sdk; "
            f"skybroker is tested with skypilot{SKYPILOT_RANGE}: "
            f"pip install 'skypilot{SKYPILOT_RANGE}'"
        )


def check_clouds(clouds: set[str]) -> None:
    """Raise unless SkyPilot is installed and can use every cloud in `clouds` (`sky check`
    through its API server); the error says what to install or configure."""
    sdk = import_sdk()
    check_sdk(sdk)
    wanted = sorted(c.lower() for c in clouds)
    if "local" in wanted:
        raise ProvisionError("the plan runs on this machine (cloud 'local'): use infra: local")
    try:
        result = sdk.get(sdk.check(tuple(wanted), verbose=False)) or {}
    except Exception as e:
        raise map_sky_error(e, None, "sky check") from e
    enabled = {
        cloud.lower()
        for workspace in result.values()
        for cloud, capabilities in (workspace or {}).items()
        if "compute" in capabilities
    }
    missing = [c for c in wanted if c not in enabled]
    if not missing:
        return
    fix = (
        f"configure credentials for {', '.join(missing)}, then run `sky check {' '.join(missing)}`"
    )
    if not enabled:
        raise NoCloudAccessError(f"SkyPilot has no cloud enabled for compute: {fix}")
    raise CredentialsError(
        f"SkyPilot cannot use {', '.join(missing)} (enabled: {', '.join(sorted(enabled))}): {fix}"
    )


def _describe(errors: list[BaseException]) -> str:
    return "; ".join(f"{type(e).__name__}: {e}" for e in errors)


def map_sky_error(
    e: BaseException, spec: ReplicaSpec | None, call: str = "SkyPilot"
) -> ProvisionError:
    """SkyPilot's exception as the broker's own error (CapacityError feeds failover).

    Errors a user can act on say what to do; any other names `call` and SkyPilot's message.
    """
    if isinstance(e, ProvisionError):
        return e
    from sky import exceptions as sx

    where = f" for {spec.name} on {'/'.join(map(str, spec.offering_key))}" if spec else ""
    credential_errors = (
        sx.InvalidCloudCredentials,
        sx.CloudUserIdentityError,
        sx.ClusterOwnerIdentityMismatchError,
    )
    if isinstance(e, sx.ProvisionPrechecksError):
        reasons = list(e.reasons)
        if reasons and all(isinstance(r, sx.ResourcesUnavailableError) for r in reasons):
            e = reasons[0]
        else:
            return ProvisionError(f"{call}: SkyPilot prechecks failed{where}: {_describe(reasons)}")
    if isinstance(e, sx.ResourcesUnavailableError):
        history = list(e.failover_history)
        if history and all(isinstance(h, credential_errors) for h in history):
            return CredentialsError(
                f"cloud credentials rejected{where}: {_describe(history)}. "
                "Fix them, then run `sky check`"
            )
        detail = _describe(history) if history else str(e)
        message = f"no capacity{where}: {detail}"
        if spec is None:
            return ProvisionError(f"{call}: {message}")
        return CapacityError(spec.offering_key, message)
    if isinstance(e, sx.NoCloudAccessError):
        return NoCloudAccessError(
            f"SkyPilot has no cloud enabled{where}: {e}. Configure credentials, then run "
            "`sky check`"
        )
    if isinstance(e, credential_errors):
        return CredentialsError(
            f"cloud credentials problem{where}: {e}. Fix them, then run `sky check`"
        )
    if isinstance(e, sx.ApiServerConnectionError):
        return ProvisionError(
            f"cannot reach the SkyPilot API server{where}: {e}. Start it with `sky api start` "
            "or point SKYPILOT_API_SERVER_ENDPOINT at yours"
        )
    if isinstance(e, sx.RequestCancelled):
        return ProvisionError(f"{call} was cancelled{where}: {e}")
    return ProvisionError(f"{call} failed{where}: {type(e).__name__}: {e}")
