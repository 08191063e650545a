"""CLI commands for deployments and the broker server: launch, status, down, logs,
dashboard, server.

They all go through the broker's REST API (skybroker.client): to `--api-url` /
$SKYBROKER_API_URL when given, else to the local broker server, started in the background
when it is not running. Errors print one clear line (no traceback) and exit 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from skybroker.server import DEFAULT_HOST, DEFAULT_PORT

if TYPE_CHECKING:
    from skybroker.client import BrokerClient

console = Console()
err_console = Console(stderr=True)

ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--api-url",
        envvar="SKYBROKER_API_URL",
        help="URL of a remote broker server (default: the local one, started on demand).",
    ),
]
TERMINAL = ("READY", "FAILED")
DASHBOARD_PATH = "/dashboard"  # skybroker.dashboard serves it

server_app = typer.Typer(help="Run the broker server (REST API + controller) in the background.")


@contextmanager
def _errors() -> Iterator[None]:
    """Turn the broker's errors into one red line and exit code 1."""
    from skybroker.client import ApiError, BrokerUnavailable
    from skybroker.server import ServerError

    try:
        yield
    except ApiError as e:
        where = f" (field: {e.field})" if e.field and e.field not in e.message else ""
        err_console.print(f"[red]error:[/red] {e.message}{where}", highlight=False)
        raise typer.Exit(1) from None
    except (BrokerUnavailable, ServerError) as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None


def _client(api_url: str | None) -> BrokerClient:
    """A client of `api_url`, else of the local broker server, which is started (and said
    so) when none runs: it keeps running in the background, as SkyPilot's API server does."""
    from skybroker import server
    from skybroker.client import BrokerClient

    if api_url is not None:
        return BrokerClient(api_url)
    if server.status().running:
        return BrokerClient()
    with err_console.status("starting the local broker server ..."):
        client = BrokerClient()
    err_console.print(
        f"started the local broker server at {client.api_url} in the background "
        "(`skybroker server stop` stops it)",
        highlight=False,
    )
    return client


def _money(x: Any) -> str:
    return f"${x:,.2f}/h" if isinstance(x, int | float) else "-"


# ---------------------------------------------------------------- plan display


def show_plan(answer: dict[str, Any]) -> None:
    """Print a plan as POST /v1/plans answers it: placements, $/h, solver, baselines."""
    plan = answer["plan"]
    table = Table(
        title=f"plan for {answer['name']} ({answer['infra']}): {plan.get('model', '')}",
        title_justify="left",
    )
    for col in ("cloud", "region", "instance", "GPUs", "spot", "count", "$/h", "req/s each",
                "TTFT", "TPOT"):  # fmt: skip
        table.add_column(col, justify="right" if col in ("count", "$/h", "req/s each") else "left")
    for p in plan.get("placements", []):
        gpus = "cpu" if p["gpu"] == "cpu" else f"{p['gpu_count']}x{p['gpu']}"
        table.add_row(
            p["cloud"],
            p["region"],
            p["instance_type"],
            gpus,
            "yes" if p["spot"] else "no",
            str(p["replicas"]),
            f"{p['cost_per_hour']:.2f}",
            f"{p['capacity_rps']:.2f}",
            f"{p['ttft_s'] * 1000:.0f} ms",
            f"{p['tpot_s'] * 1000:.1f} ms",
        )
    if Console(width=10_000).measure(table).maximum <= console.width:
        console.print(table)
    else:  # too narrow for the table: a block per placement, nothing cut
        console.print(table.title, highlight=False)
        for i, p in enumerate(plan.get("placements", []), 1):
            market = "spot" if p["spot"] else "on-demand"
            gpus = "cpu" if p["gpu"] == "cpu" else f"{p['gpu_count']}x{p['gpu']}"
            console.print(
                f"{i}. {p['replicas']} x {p['instance_type']} ({gpus}, "
                f"{market}) in {p['cloud']}/{p['region']}, ${p['cost_per_hour']:.2f}/h\n"
                f"   {p['capacity_rps']:.2f} req/s each; TTFT {p['ttft_s'] * 1000:.0f} ms, "
                f"TPOT {p['tpot_s'] * 1000:.1f} ms",
                highlight=False,
            )
    solver = plan.get("solver") or {}
    gap = solver.get("gap")
    console.print(
        f"total [bold]{_money(plan.get('cost_per_hour'))}[/bold]; solver {solver.get('status')}, "
        f"gap {'unknown' if gap is None else f'{gap:.2%}'}",
        highlight=False,
    )
    notes = plan.get("baseline_notes") or {}
    for name, cost in (plan.get("baselines") or {}).items():
        console.print(
            f"baseline {name}: {_money(cost) if cost is not None else 'none'} "
            f"({notes.get(name, '')})",
            highlight=False,
        )


# ---------------------------------------------------------------- launch


def _watch(client: BrokerClient, name: str, timeout: float, poll: float = 0.5) -> dict[str, Any]:
    """Poll the deployment until READY or FAILED (or timeout), printing new events."""
    seen = 0
    deadline = time.monotonic() + timeout
    with err_console.status(f"launching {name} ...") as spinner:
        while True:
            dep = client.get(name)
            for ev in dep["events"]:
                if ev["id"] > seen:
                    console.print(f"  [dim]{ev['kind']}[/dim] {ev['message']}", highlight=False)
                    seen = ev["id"]
            spinner.update(
                f"{name}: {dep['status']} · {dep['ready_replicas']}/{dep['desired_replicas']} "
                "replicas ready"
            )
            if dep["status"] in TERMINAL or time.monotonic() > deadline:
                return dep
            time.sleep(poll)


def _checked_text(path: Path, infra: str | None) -> str:
    """The spec at `path` after the one validation (`plan_cli.checked_spec`), as JSON with
    absolute file paths and the model's local copy filled in; exits 2 when it is invalid."""
    import json

    from skybroker.plan_cli import checked_spec

    spec, _ = checked_spec(path, infra=infra, launch=True)
    return json.dumps(spec.model_dump(mode="json", exclude_none=True))


def launch(
    spec: Annotated[Path, typer.Argument(help="deployment spec (YAML)")],
    infra: Annotated[
        str | None, typer.Option(help="override the spec's infra: local or skypilot")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="launch without asking")] = False,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="return once launched, do not wait for ready")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for ready")] = 1800.0,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="plan, build every replica's launch and have the provisioner validate it "
            "(SkyPilot: sky launch --dryrun); launch nothing",
        ),
    ] = False,
    api_url: ApiUrl = None,
) -> None:
    """Plan a deployment, show the plan, ask, launch it and wait until its endpoint serves."""
    if infra is not None and infra not in ("local", "skypilot"):
        err_console.print(f"[red]error:[/red] --infra must be local or skypilot, not {infra!r}")
        raise typer.Exit(1)
    if api_url is None:  # this machine's broker: check here, before anything starts
        text = _checked_text(spec, infra)
    else:  # a remote broker checks it against its own disk and catalog
        try:
            text = spec.read_text()
        except OSError as e:
            err_console.print(f"[red]error:[/red] cannot read spec {spec}: {e.strerror}")
            raise typer.Exit(1) from None
    with _errors():
        client = _client(api_url)
        if dry_run:
            with err_console.status("planning and validating every replica's launch ..."):
                show_dry_run(client.launch(text, infra, dry_run=True))
            return
        with err_console.status("planning ..."):
            answer = client.plan(text, infra)
        show_plan(answer)
        if not yes and not typer.confirm("Launch this plan?", default=False):
            console.print("not launched")
            raise typer.Exit(0)
        dep = client.launch(text, infra)
        console.print(f"deployment [bold]{dep['name']}[/bold]: {dep['status']}")
        key = dep.get("api_key")
        console.print(
            f"api key: {key}  (again: skybroker status {dep['name']} --show-key)", highlight=False
        )
        if detach:
            console.print(f"follow it with: skybroker status {dep['name']}")
            return
        name = dep["name"]
        dep = _watch(client, name, timeout)
        if dep["status"] == "FAILED":
            err_console.print(f"[red]error:[/red] {name} failed: {dep['message']}", highlight=False)
            raise typer.Exit(1)
        if dep["status"] != "READY":
            err_console.print(
                f"[red]error:[/red] {name} is not ready after {timeout:.0f}s ({dep['status']}); "
                f"the broker keeps trying. See `skybroker status {name}`, "
                f"`skybroker logs {name}`, or tear it down with `skybroker down {name}`.",
                highlight=False,
            )
            raise typer.Exit(1)
        console.print(
            f"[green]ready[/green]: {dep['ready_replicas']} replicas, {_money(dep['cost_per_hour'])}"
        )
        console.print(f"endpoint: [bold]{dep['endpoint']}[/bold]  (OpenAI-compatible)")


def show_dry_run(answer: dict[str, Any]) -> None:
    """What a launch would start where at what $/h, and what the provisioner checked."""
    table = Table(title=f"dry run of {answer['name']} (infra: {answer['infra']})")
    for col in ("replicas", "where", "market", "GPUs", "$/h each"):
        table.add_column(col)
    for r in answer["replicas"]:
        cloud, region, instance, spot = r["key"]
        gpus = f"{r['gpu']} x{r['gpu_count']}" if r.get("gpu") else "-"
        market = "spot" if spot else "on-demand"
        where = f"{cloud}/{region}/{instance}"
        table.add_row(str(r["replicas"]), where, market, gpus, _money(r["price_per_hour"]))
    console.print(table)
    for r in answer["replicas"]:
        task = r.get("task")
        if task:  # the SkyPilot Task, as validated by `sky launch --dryrun`
            console.print(f"{r['cluster']}: SkyPilot validated its Task", style="bold")
            console.print(f"  setup: {task.get('setup')}", markup=False, highlight=False)
            console.print(f"  run: {task.get('run')}", markup=False, highlight=False)
    console.print(f"total {_money(answer['cost_per_hour'])}; nothing was launched")


# ---------------------------------------------------------------- status / down / logs


def _status_table(deps: list[dict[str, Any]]) -> Table:
    table = Table(title="deployments", title_justify="left")
    for col in ("name", "infra", "status", "ready", "$/h", "endpoint"):
        table.add_column(col, overflow="fold")  # a narrow terminal wraps cells, never cuts
    for d in deps:
        table.add_row(
            d["name"],
            d["infra"],
            d["status"],
            f"{d['ready_replicas']}/{d['desired_replicas']}",
            _money(d["cost_per_hour"]),
            d["endpoint"] or "-",
        )
    return table


def _show_deployment(d: dict[str, Any]) -> None:
    console.print(
        f"[bold]{d['name']}[/bold] ({d['infra']}): {d['status']}  "
        f"{d['ready_replicas']}/{d['desired_replicas']} ready  {_money(d['cost_per_hour'])}",
        highlight=False,
    )
    if d["message"]:
        console.print(f"  {d['message']}", highlight=False)
    if d.get("failures") and d["status"] != "FAILED":
        wait = d.get("next_launch_in_s")
        after = f"; next launch in {wait:.0f}s" if wait else ""
        console.print(f"  [yellow]{d['failures']} replica failure(s) in a row{after}[/yellow]")
    for c in d.get("cooldowns") or []:
        cloud, region, itype, spot = c["key"]
        left = max(0.0, c["until"] - time.time()) / 60
        what = f"{cloud}/{region}/{itype}{' (spot)' if spot else ''}"
        console.print(
            f"  [yellow]{what} cools down: out of the plan for {left:.0f} more min[/yellow]"
        )
    if d.get("network_suspect_since"):
        since = time.time() - d["network_suspect_since"]
        console.print(f"  [yellow]most replicas have failed their probes for {since:.0f}s: the "
                      "broker's own network is suspect[/yellow]")  # fmt: skip
    console.print(f"endpoint: {d['endpoint'] or '-'}")
    table = Table(title="replicas", title_justify="left")
    for col in ("#", "replica", "status", "healthy", "where", "market", "url"):
        table.add_column(col, overflow="fold")
    for i, r in enumerate(d["replicas"]):
        table.add_row(
            str(i),
            r["name"],
            r["status"],
            "yes" if r["healthy"] else "no",
            f"{r['cloud']}/{r['region']}/{r['instance_type']}",
            "spot" if r["spot"] else "on-demand",
            r["url"] or "-",
        )
    console.print(table)
    for note in d.get("left_open", []):
        console.print(f"[yellow]open:[/yellow] {note}", highlight=False)
    if d.get("autoscale"):
        _show_scaling(d["autoscale"])
    if d["events"]:
        console.print("events:")
        for ev in d["events"][-10:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(ev["time"]))
            console.print(f"  {stamp} [dim]{ev['kind']}[/dim] {ev['message']}", highlight=False)


def _show_scaling(a: dict[str, Any]) -> None:
    """Replicas over time and the autoscaler's last decisions."""
    steps = [
        f"{time.strftime('%H:%M:%S', time.localtime(t))} {n} ({_money(c or 0.0)})"
        for t, n, c in a["history"][-12:]
    ]
    if steps:
        console.print("replicas over time: " + " -> ".join(steps), highlight=False)
    if a["decisions"]:
        console.print("scaling decisions:")
        for dec in a["decisions"][-5:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(dec["time"]))
            console.print(f"  {stamp} {dec['reason']}", highlight=False)


def status(
    name: Annotated[str | None, typer.Argument(help="one deployment (default: all)")] = None,
    show_key: Annotated[
        bool, typer.Option("--show-key", help="print the key of the deployment's endpoint")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the API's JSON (a list, or one deployment)")
    ] = False,
    api_url: ApiUrl = None,
) -> None:
    """Deployments: status, replicas and their health, $/h, endpoint."""
    if show_key and name is None:
        err_console.print("[red]error:[/red] --show-key needs a deployment NAME")
        raise typer.Exit(1)
    import json

    with _errors():
        client = _client(api_url)
        if name is None:
            deps = client.list()
            if as_json:
                typer.echo(json.dumps(deps, indent=2))
            elif not deps:
                console.print("no deployments")
            else:
                console.print(_status_table(deps))
        elif as_json:
            typer.echo(json.dumps(client.get(name), indent=2))
        else:
            _show_deployment(client.get(name))
            if show_key:
                console.print(f"api key: {client.key(name)}", highlight=False)


def down(
    name: Annotated[str, typer.Argument(help="the deployment to tear down")],
    api_url: ApiUrl = None,
) -> None:
    """Tear a deployment down: replicas, router, state. Running it twice is fine."""
    from skybroker.client import ApiError

    with _errors():
        client = _client(api_url)
        try:
            with err_console.status(f"tearing down {name} ..."):
                client.delete(name)
        except ApiError as e:
            if e.status != 404:
                raise
            console.print(f"no deployment named {name!r}: nothing to tear down")
            return
        console.print(f"{name}: torn down")


def logs(
    name: Annotated[str, typer.Argument(help="the deployment")],
    replica: Annotated[int | None, typer.Option(help="replica index (see `status NAME`)")] = None,
    tail: Annotated[int, typer.Option(min=1, help="number of lines")] = 200,
    probes: Annotated[
        bool, typer.Option("--probes", help="keep the /health probe lines (filtered by default)")
    ] = False,
    api_url: ApiUrl = None,
) -> None:
    """Print the log of one replica of a deployment."""
    with _errors():
        text = _client(api_url).logs(name, replica, tail, probes=probes)
    typer.echo(text, nl=not text.endswith("\n"))


def _gui_browser() -> Any:
    """The system's web browser when one opens a window of its own (never one that would
    take over this terminal, nor any without a display or in CI); else None."""
    import os
    import sys
    import webbrowser

    if os.environ.get("CI") or not sys.stdout.isatty():
        return None
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return None
    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        return None
    if isinstance(browser, webbrowser.BackgroundBrowser):
        return browser
    if isinstance(browser, webbrowser.GenericBrowser):  # a console browser: it would block
        return None
    if isinstance(browser, webbrowser.UnixBrowser) and not browser.background:
        return None
    return browser


def dashboard(
    api_url: ApiUrl = None,
    browser: Annotated[
        bool, typer.Option("--browser/--no-browser", help="open it in a web browser if one")
    ] = True,
) -> None:
    """Print the web dashboard's URL and open it in a browser (when there is one)."""
    with _errors():
        client = _client(api_url)
        client.health()  # a URL that answers, not one that merely parses
    url = f"{client.api_url}{DASHBOARD_PATH}"
    console.print(f"dashboard: {url}", highlight=False)
    opener = _gui_browser() if browser else None
    if opener is not None and opener.open(url, new=2):
        console.print("opened in your web browser", highlight=False)


# ---------------------------------------------------------------- server


@server_app.command("start")
def server_start(
    host: Annotated[
        str, typer.Option(help="address to bind (non-loopback needs a token)")
    ] = DEFAULT_HOST,
    port: Annotated[
        int, typer.Option(envvar="SKYBROKER_API_PORT", help="port to bind")
    ] = DEFAULT_PORT,
    token_file: Annotated[
        Path | None, typer.Option(help="file holding the API token (or $SKYBROKER_API_TOKEN)")
    ] = None,
    state_url: Annotated[
        str | None,
        typer.Option(envvar="SKYBROKER_STATE_URL", help="SQLAlchemy URL of the state store"),
    ] = None,
    router_host: Annotated[
        str, typer.Option(help="address the deployments' OpenAI routers bind")
    ] = DEFAULT_HOST,
    allow_path: Annotated[
        list[Path] | None,
        typer.Option(
            help="directory whose files specs sent over the API may name (repeatable; "
            "$SKYBROKER_ALLOWED_PATHS adds more)"
        ),
    ] = None,
) -> None:
    """Start the broker server in the background (no-op if it runs)."""
    from skybroker import server

    with _errors(), err_console.status("starting the broker server ..."):
        info, started = server.start(
            host,
            port,
            token_file=token_file,
            state_url=state_url,
            router_host=router_host,
            allow_paths=list(allow_path or []),
        )
    what = "started" if started else "already running"
    console.print(f"broker server {what}: {info.url} (pid {info.pid}); log: {server.log_path()}")
    console.print(f"dashboard: {info.url}{DASHBOARD_PATH}", highlight=False)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the broker server (deployments keep running and are found again on start)."""
    from skybroker import server

    with _errors():
        st = server.stop()
    if st.info is None:
        note = " (removed a stale pid file)" if st.stale_removed else ""
        console.print(f"broker server is not running{note}")
    else:
        console.print(f"broker server stopped (pid {st.info.pid})")


@server_app.command("status")
def server_status() -> None:
    """Whether the broker server runs, where, and whether it answers."""
    from skybroker import server

    st = server.status()
    if not st.running or st.info is None:
        note = " (removed a stale pid file)" if st.stale_removed else ""
        console.print(f"broker server is not running{note}")
        raise typer.Exit(1)
    health = "healthy" if st.healthy else "[red]not answering /health[/red]"
    console.print(f"broker server running: {st.info.url} (pid {st.info.pid}), {health}")
    console.print(f"log: {server.log_path()}")


def register(app: typer.Typer) -> None:
    """Add launch/status/down/logs/dashboard and the `server` group to the main CLI."""
    for fn in (launch, status, down, logs, dashboard):
        app.command()(fn)
    app.add_typer(server_app, name="server")
