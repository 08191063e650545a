"""The checks a spec passes before anything is planned or started, beyond its schema.

`check_spec(spec, catalog, allowed=...)` is the one validation that `skybroker spec check`,
`plan`, `launch` and the REST API run. It checks what the schema cannot know:

- files (`model.path`, `workload.trace`, `engine.profiles`) exist and parse; a spec that came
  over the API may name only files under the directories the server allows (`allowed`), a
  spec the CLI read from the user's own disk names any file (`allowed=None`);
- the model resolves: its numbers, its files, a name the planner knows; an `infra: local`
  deployment needs weights on this machine, so a name alone is resolved to a local copy
  (`skybroker.models.find_local_copy`) and written into `model.path` (a model given by its
  architecture's numbers alone plans, but does not launch);
- user regions, GPU kinds, clouds and regions are ones the catalog knows.

It returns the spec with paths made absolute and the model's path filled in, or raises one
`SpecError` listing every problem (field, what is wrong, what is allowed). Messages never
quote a file's contents.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from skybroker.spec import DeploymentSpec, SpecError

if TYPE_CHECKING:
    from skybroker.catalog.schema import Catalog

ALLOWED_PATHS_ENV = "SKYBROKER_ALLOWED_PATHS"


def allowed_paths_from_env() -> list[Path]:
    """$SKYBROKER_ALLOWED_PATHS: the directories API specs may name files under."""
    raw = os.environ.get(ALLOWED_PATHS_ENV, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


class _Problems:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, message: str) -> None:
        self.items.append((field, message))


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    real = path.resolve()
    return any(real.is_relative_to(r.expanduser().resolve()) for r in roots)


def _file(value: str, field: str, allowed: Sequence[Path] | None, out: _Problems) -> Path | None:
    """`value` as an absolute path the spec may name, or None (with the problem added)."""
    p = Path(value).expanduser()
    if allowed is not None:
        if not p.is_absolute():
            out.add(field, f"{value!r} is relative: a spec sent to the broker's API names files "
                           "by absolute path")  # fmt: skip
            return None
        if not _inside(p, allowed):
            where = ", ".join(str(r) for r in allowed)
            out.add(field, f"{value!r} is outside the directories this broker server lets API "
                           f"specs name files under ({where or 'none'}); start it with "
                           "`skybroker server start --allow-path DIR`")  # fmt: skip
            return None
    if not p.exists():
        out.add(field, f"{value!r} does not exist")
        return None
    return p.resolve()


def _check_files(spec: DeploymentSpec, allowed: Sequence[Path] | None,
                 out: _Problems) -> DeploymentSpec:  # fmt: skip
    from skybroker.perf.profile import ProfileError, load
    from skybroker.perf.workload import read_trace

    m, w, e = spec.model, spec.workload, spec.engine
    path = _file(m.path, "model.path", allowed, out) if m.path else None
    trace = _file(w.trace, "workload.trace", allowed, out) if w.trace else None
    if trace is not None:
        try:
            read_trace(trace)
        except (OSError, ValueError) as err:
            out.add("workload.trace", str(err))
    profiles = []
    for i, raw in enumerate(e.profiles):
        p = _file(raw, f"engine.profiles.{i}", allowed, out)
        if p is None:
            continue
        try:
            load(p)
        except ProfileError as err:
            out.add(f"engine.profiles.{i}", str(err))
        profiles.append(str(p))
    return spec.model_copy(update={
        "model": m.model_copy(update={"path": str(path) if path else m.path}),
        "workload": w.model_copy(update={"trace": str(trace) if trace else w.trace}),
        "engine": e.model_copy(update={"profiles": profiles or e.profiles}),
    })  # fmt: skip


def _check_model(spec: DeploymentSpec, launch: bool, out: _Problems) -> DeploymentSpec:
    from skybroker.models import find_local_copy
    from skybroker.plan_perf import resolve_arch

    m = spec.model
    if spec.infra == "local" and m.path is None:
        found = find_local_copy(m.name) if m.name else None
        if found is not None:
            m = m.model_copy(update={"path": str(found)})
            spec = spec.model_copy(update={"model": m})
        elif launch or m.architecture is None:  # numbers alone plan, but do not serve
            out.add("model", f"no copy of {m.label!r} on this machine, and `infra: local` runs "
                             "the engine here: give model.path (a Hugging Face model dir or a "
                             ".gguf file), download it into the Hugging Face cache, or add its "
                             "dir to $SKYBROKER_MODEL_DIRS")  # fmt: skip
            return spec
    if m.path is not None and not Path(m.path).exists():
        return spec  # already reported by _check_files
    try:
        resolve_arch(m, spec.infra)
    except SpecError as err:
        field, _, msg = str(err).partition(": ")
        out.add(field if field.startswith("model") else "model", msg or str(err))
    except ValueError as err:  # a HF dir without a usable config.json
        out.add("model.path", str(err))
    except Exception as err:  # a file that is not what its name says (truncated GGUF, ...)
        out.add("model.path", f"{m.path!r} cannot be read as a model ({type(err).__name__})")
    return spec


def _known(kind: str, names: Sequence[str], have: set[str], field: str, out: _Problems) -> None:
    low = {h.lower(): h for h in have}
    for i, n in enumerate(names):
        if n.lower() not in low:
            out.add(f"{field}.{i}", f"unknown {kind} {n!r}; the catalog has: "
                                    f"{', '.join(sorted(have))}")  # fmt: skip


def _check_catalog_names(spec: DeploymentSpec, catalog: Catalog, out: _Problems) -> None:
    from skybroker.plan_problem import user_location

    for name, u in spec.workload.users.items():
        try:
            user_location(name, u.lat, u.lon, catalog)
        except SpecError as err:
            out.add(f"workload.users.{name}", str(err).removeprefix("workload.users: "))
    if spec.infra == "local":
        return  # this machine is the only offering: the catalog's constraints do not apply
    c = spec.constraints
    gpus = set(catalog.gpus) | {o.gpu for o in catalog.offerings}
    _known("GPU kind", c.gpus or [], gpus, "constraints.gpus", out)
    _known("GPU kind", c.exclude_gpus, gpus, "constraints.exclude_gpus", out)
    _known("cloud", c.clouds or [], {o.cloud for o in catalog.offerings},
           "constraints.clouds", out)  # fmt: skip
    regions = {o.region for o in catalog.offerings}
    _known("region", c.regions or [], regions, "constraints.regions", out)
    _known("region", c.exclude_regions, regions, "constraints.exclude_regions", out)


def check_spec(spec: DeploymentSpec, catalog: Catalog | None = None, *,
               allowed: Sequence[Path] | None = None, launch: bool = False,
               source: str = "") -> DeploymentSpec:  # fmt: skip
    """`spec` with absolute file paths and its model resolved, or SpecError listing every
    problem. `allowed=None`: any file (the CLI); else only files under these dirs (the API).
    `launch`: it is about to run, so a local model needs its weights even where its
    architecture's numbers alone would plan."""
    if catalog is None:
        from skybroker.catalog import load_catalog

        catalog = load_catalog()
    out = _Problems()
    spec = _check_files(spec, allowed, out)
    spec = _check_model(spec, launch, out)
    _check_catalog_names(spec, catalog, out)
    if out.items:
        head = f"invalid deployment spec {source}:".replace("  ", " ").replace(" :", ":")
        lines = [head] + [f"  {f}: {msg}" for f, msg in out.items]
        raise SpecError("\n".join(lines), out.items)
    return spec
