"""`skybroker plan SPEC` and `skybroker spec schema`: the planner's command line.

Imports stay light at module level (typer only): the spec, perf model, catalog and pulp load
inside the commands so `skybroker --help` stays fast.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from skybroker.catalog.schema import Catalog
    from skybroker.plan import Placement, Plan
    from skybroker.spec import DeploymentSpec

spec_app = typer.Typer(help="Deployment spec tools.", no_args_is_help=True)


@spec_app.command("schema")
def spec_schema() -> None:
    """Print the JSON schema of a deployment spec (for editors and CI validation)."""
    from skybroker.spec import spec_json_schema

    typer.echo(spec_json_schema())


CatalogDirs = Annotated[
    list[Path] | None,
    typer.Option(
        "--catalog", help="extra catalog dir(s) (offerings.csv, ...) on top of the bundled one"
    ),
]


def checked_spec(path: Path, catalog_dirs: list[Path] | None = None, infra: str | None = None,
                 launch: bool = False) -> tuple[DeploymentSpec, Catalog]:  # fmt: skip
    """The spec at `path` (its infra overridden by `infra`) through the one validation
    (`skybroker.validate.check_spec`), and the catalog it was checked against; a bad spec or
    catalog prints one message and exits 2."""
    from skybroker.catalog import CatalogError, load_catalog
    from skybroker.spec import SpecError, load_spec
    from skybroker.validate import check_spec

    try:
        spec = load_spec(path)
        if infra is not None:
            spec = spec.model_copy(update={"infra": infra})
        catalog = load_catalog(list(catalog_dirs) if catalog_dirs else None)
        return check_spec(spec, catalog, launch=launch, source=str(path)), catalog
    except SpecError as e:
        typer.echo(str(e), err=True)
    except CatalogError as e:
        typer.echo(f"catalog error: {e}", err=True)
    raise typer.Exit(2)


@spec_app.command("check")
def spec_check(
    path: Annotated[Path, typer.Argument(help="deployment spec YAML")],
    catalog_dirs: CatalogDirs = None,
) -> None:
    """Validate a deployment spec (schema, files, model, names) as plan and launch do."""
    spec, _ = checked_spec(path, catalog_dirs)
    model = spec.model.path or spec.model.name
    typer.echo(f"{path}: ok ({spec.name}, infra {spec.infra}, model {model})")


def plan_command(
    path: Annotated[Path, typer.Argument(help="deployment spec YAML")],
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
    catalog_dirs: CatalogDirs = None,
    time_limit: Annotated[
        float, typer.Option(min=0.1, help="solver time limit per component, seconds")
    ] = 20.0,
    no_baselines: Annotated[
        bool, typer.Option("--no-baselines", help="skip the baselines")
    ] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="one table row per placement, whatever the width")
    ] = False,
) -> None:
    """The cheapest placement that meets the spec's SLO, with the why."""
    from skybroker.plan import InfeasibleError, make_plan

    spec, catalog = checked_spec(path, catalog_dirs)
    try:
        plan = make_plan(spec, catalog, time_limit=time_limit, baselines=not no_baselines)
    except InfeasibleError as e:
        typer.echo(f"infeasible: {e}", err=True)
        raise typer.Exit(3) from None
    if as_json:
        typer.echo(json.dumps(plan.to_dict(), indent=2))
    else:
        render_plan(plan, wide=wide)


def perf_label(source: str) -> str:
    """`roofline`, or `profile <file name>` for a measured profile."""
    kind, _, path = source.partition(":")
    return f"{kind} {Path(path).name}" if path else kind


_NOT_HERE = re.compile(r"^profile (\S+) not used for (.+?): measured on (.+?), not on ")


def summarize_notes(notes: list[str]) -> list[str]:
    """The perf notes with one line per profile that matched other hardware only ("measured
    profile X is for gpu:H200x1 only: 17 replica kinds planned from the roofline")."""
    grouped: dict[tuple[str, str], int] = {}
    out = []
    for n in notes:
        m = _NOT_HERE.match(n)
        if m is None:
            out.append(n)
        else:
            key = (Path(m[1]).name, m[3])
            grouped[key] = grouped.get(key, 0) + 1
    for (name, hw), count in grouped.items():
        kinds = f"{count} replica kind{'s' if count > 1 else ''}"
        out.append(f"measured profile {name} is for {hw} only: {kinds} planned from the roofline")
    return out


def _gpus(p: Placement) -> str:
    o = p.offering
    gpus = "cpu" if o.gpu == "cpu" else f"{o.gpu_count}x{o.gpu}"
    if p.data_parallel > 1:
        gpus += f" (TP{p.tensor_parallel} x{p.data_parallel})"
    elif p.tensor_parallel > 1:
        gpus += f" (TP{p.tensor_parallel})"
    return gpus


def _table(plan: Plan, pct: str) -> Table:
    from rich.table import Table

    s = plan.spec
    t = Table(title=f"{s.name}: {plan.model}, {s.workload.rate:g} req/s", title_justify="left")
    for col in ("cloud", "region", "instance", "GPUs", "spot", "count", "$/h", "req/s each",
                f"TTFT {pct}", f"TPOT {pct}", "serves", "perf"):  # fmt: skip
        t.add_column(col, justify="right" if col in ("count", "$/h", "req/s each") else "left",
                     no_wrap=True)  # fmt: skip
    for p in plan.placements:
        o = p.offering
        serves = ", ".join(f"{u} {r:.2f}" for u, r in sorted(p.serves.items()))
        t.add_row(o.cloud, o.region, o.instance_type, _gpus(p), "yes" if p.spot else "no",
                  str(p.replicas), f"{p.cost_per_hour:.2f}", f"{p.capacity_rps:.2f}",
                  f"{p.ttft_s * 1000:.0f} ms", f"{p.tpot_s * 1000:.1f} ms", serves,
                  perf_label(p.perf_source))  # fmt: skip
    return t


def _blocks(plan: Plan, pct: str) -> list[str]:
    """One short block per placement, for terminals too narrow for the table."""
    s = plan.spec
    lines = [f"{s.name}: {plan.model}, {s.workload.rate:g} req/s"]
    for i, p in enumerate(plan.placements, 1):
        o = p.offering
        market = "spot" if p.spot else "on-demand"
        serves = ", ".join(f"{u} {r:.2f}" for u, r in sorted(p.serves.items()))
        lines += [
            f"{i}. {p.replicas} x {o.instance_type} ({_gpus(p)}, {market})",
            f"   in {o.cloud}/{o.region}, ${p.cost_per_hour:.2f}/h",
            f"   {p.capacity_rps:.2f} req/s each; TTFT {pct} {p.ttft_s * 1000:.0f} ms, "
            f"TPOT {pct} {p.tpot_s * 1000:.1f} ms ({perf_label(p.perf_source)})",
            f"   serves (req/s): {serves}",
        ]
    return lines


def render_plan(plan: Plan, wide: bool = False) -> None:
    """The placements (a table where it fits the terminal, else a block each), the totals,
    solver figures and baselines; long lines wrap, nothing is cut."""
    from rich.console import Console

    s = plan.spec
    pct = f"p{s.slo.percentile:g}"
    con = Console()
    table = _table(plan, pct)
    if wide or Console(width=10_000).measure(table).maximum <= con.width:
        con.print(table, crop=False)
    else:
        for line in _blocks(plan, pct):
            con.print(line, highlight=False)
    sv = plan.solver
    gap = "unknown" if sv.gap is None else f"{sv.gap:.2%}"
    con.print(f"total ${plan.cost_per_hour:.2f}/h (egress ${plan.egress_per_hour:.2f}/h); "
              f"SLO TTFT {pct} <= {s.slo.ttft_ms:g} ms, TPOT {pct} <= {s.slo.tpot_ms:g} ms"
              + (f", RTT <= {s.slo.max_rtt_ms:g} ms" if s.slo.max_rtt_ms else ""),
              highlight=False)  # fmt: skip
    con.print(f"solver {sv.solver} {sv.status}, gap {gap}, solve {sv.solve_time_s:.2f} s, "
              f"perf model {sv.perf_time_s:.1f} s for {len(sv.searched)} GPU kind(s); "
              f"offerings {sv.num_offerings} -> classes {sv.num_classes} -> after pruning "
              f"{sv.num_pruned}, {sv.num_components} component(s)", highlight=False)  # fmt: skip
    _print_headroom(con, plan)
    for note in summarize_notes(plan.perf_notes):
        con.print(f"note: {note}", highlight=False)
    for note in plan.network_notes:
        con.print(f"network: {note}", highlight=False)
    for name, cost in plan.baselines.items():
        note = plan.baseline_notes.get(name, "")
        if cost is None:
            con.print(f"baseline {name}: none ({note})", highlight=False)
            continue
        saving = 1 - plan.cost_per_hour / cost if cost > 0 else 0.0
        # Plan and baselines are mix-corrected alike, but each by its own re-solves (a
        # heuristic), so a baseline can still come out a little cheaper.
        verdict = (
            f"this plan saves {saving:.0%}"
            if saving >= 0
            else f"this plan costs {-saving:.0%} more"
        )
        con.print(f"baseline {name}: ${cost:.2f}/h ({note}); {verdict}",
                  highlight=False)  # fmt: skip


def _print_headroom(con: object, plan: Plan) -> None:
    """Per placement: its configuration and why, the margin it was sized for, the slowdown
    it absorbs at its load, and the linear rule's error on its mix."""
    if not plan.mix_confirmed:
        con.print("note: after the re-solves some placement's simulated mix still serves less "  # type: ignore[attr-defined]
                  "than the linear rule says (mix rule below)")  # fmt: skip
    for k, p in enumerate(plan.placements, 1):
        bits = [f"margin {p.margin:.0%}"]
        if p.headroom is not None:
            bits.append(f"absorbs {p.headroom:.0%} slower steps at its load")
        if p.latency_ci is not None:
            bits.append(f"latency CI +-{p.latency_ci:.0%}")
        if p.mix_rule_error is not None:
            bits.append(f"mix rule {p.mix_rule_error:+.0%}")
        con.print(
            f"{k}. {p.offering.instance_type}: {p.config_note}; " + ", ".join(bits), highlight=False
        )  # type: ignore[attr-defined]
