"""`skybroker plan SPEC` and `skybroker spec schema`: the planner's command line.

Imports stay light at module level (typer only): the spec, perf model, catalog and pulp load
inside the commands so `skybroker --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from skybroker.plan import Plan

spec_app = typer.Typer(help="Deployment spec tools.", no_args_is_help=True)


@spec_app.command("schema")
def spec_schema() -> None:
    """Print the JSON schema of a deployment spec (for editors and CI validation)."""
    from skybroker.spec import spec_json_schema

    typer.echo(spec_json_schema())


@spec_app.command("check")
def spec_check(path: Path = typer.Argument(..., help="deployment spec YAML")) -> None:
    """Validate a deployment spec and say what is wrong, if anything."""
    from skybroker.spec import SpecError, load_spec

    try:
        spec = load_spec(path)
    except SpecError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{path}: ok ({spec.name}, infra {spec.infra})")


def plan_command(
    path: Path = typer.Argument(..., help="deployment spec YAML"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
    catalog_dir: list[Path] = typer.Option(
        [], "--catalog", help="extra catalog dir(s) (offerings.csv, ...) on top of the bundled one"
    ),
    time_limit: float = typer.Option(20.0, help="solver time limit per component, seconds"),
    no_baselines: bool = typer.Option(False, "--no-baselines", help="skip the baselines"),
) -> None:
    """The cheapest placement that meets the spec's SLO, with the why."""
    from skybroker.plan import InfeasibleError, make_plan
    from skybroker.spec import SpecError, load_spec

    try:
        spec = load_spec(path)
        catalog = None
        if catalog_dir and spec.infra != "local":
            from skybroker.catalog import load_catalog

            catalog = load_catalog(list(catalog_dir))
        plan = make_plan(spec, catalog, time_limit=time_limit, baselines=not no_baselines)
    except SpecError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    except InfeasibleError as e:
        typer.echo(f"infeasible: {e}", err=True)
        raise typer.Exit(3) from None
    if as_json:
        typer.echo(json.dumps(plan.to_dict(), indent=2))
    else:
        render_plan(plan)


def perf_label(source: str) -> str:
    """`roofline`, or `profile <file name>` for a measured profile."""
    kind, _, path = source.partition(":")
    return f"{kind} {Path(path).name}" if path else kind


def render_plan(plan: Plan) -> None:
    """A rich table of the placements, totals, solver figures and baselines."""
    from rich.console import Console
    from rich.table import Table

    s = plan.spec
    pct = f"p{s.slo.percentile:g}"
    t = Table(title=f"{s.name}: {plan.model}, {s.workload.rate:g} req/s", title_justify="left")
    for col in ("cloud", "region", "instance", "GPUs", "spot", "count", "$/h", "req/s each",
                f"TTFT {pct}", f"TPOT {pct}", "serves", "perf"):  # fmt: skip
        t.add_column(col, justify="right" if col in ("count", "$/h", "req/s each") else "left")
    for p in plan.placements:
        o = p.offering
        gpus = "cpu" if o.gpu == "cpu" else f"{o.gpu_count}x{o.gpu}"
        if p.data_parallel > 1:
            gpus += f" (TP{p.tensor_parallel} x{p.data_parallel})"
        elif p.tensor_parallel > 1:
            gpus += f" (TP{p.tensor_parallel})"
        serves = ", ".join(f"{u} {r:.2f}" for u, r in sorted(p.serves.items()))
        t.add_row(o.cloud, o.region, o.instance_type, gpus, "yes" if p.spot else "no",
                  str(p.replicas), f"{p.cost_per_hour:.2f}", f"{p.capacity_rps:.2f}",
                  f"{p.ttft_s * 1000:.0f} ms", f"{p.tpot_s * 1000:.1f} ms", serves,
                  perf_label(p.perf_source))  # fmt: skip
    con = Console()
    con.print(t)
    sv = plan.solver
    gap = "unknown" if sv.gap is None else f"{sv.gap:.2%}"
    con.print(f"total ${plan.cost_per_hour:.2f}/h (egress ${plan.egress_per_hour:.2f}/h); "
              f"SLO TTFT {pct} <= {s.slo.ttft_ms:g} ms, TPOT {pct} <= {s.slo.tpot_ms:g} ms"
              + (f", RTT <= {s.slo.max_rtt_ms:g} ms" if s.slo.max_rtt_ms else ""))  # fmt: skip
    con.print(f"solver {sv.solver} {sv.status}, gap {gap}, solve {sv.solve_time_s:.2f} s, "
              f"perf model {sv.perf_time_s:.1f} s for {len(sv.searched)} GPU kind(s); "
              f"offerings {sv.num_offerings} -> classes "
              f"{sv.num_classes} -> after pruning {sv.num_pruned}, {sv.num_components} component(s)")  # fmt: skip
    _print_headroom(con, plan)
    for note in plan.perf_notes:
        con.print(f"note: {note}")
    for name, cost in plan.baselines.items():
        note = plan.baseline_notes.get(name, "")
        if cost is None:
            con.print(f"baseline {name}: none ({note})")
            continue
        saving = 1 - plan.cost_per_hour / cost if cost > 0 else 0.0
        con.print(f"baseline {name}: ${cost:.2f}/h ({note}); this plan saves {saving:.0%}")


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
        con.print(f"{k}. {p.offering.instance_type}: {p.config_note}; " + ", ".join(bits))  # type: ignore[attr-defined]
