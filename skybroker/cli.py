"""The `skybroker` command line (typer).

Sub-command groups live in their own modules and are added here. Heavy imports (torch,
SkyPilot, cloud SDKs, pulp) stay inside the command functions so `skybroker --help` is fast.
"""

from __future__ import annotations

import platform
import sys

import typer

from skybroker import __version__, catalog_cli
from skybroker.plan_cli import plan_command, spec_app

app = typer.Typer(
    name="skybroker",
    help="Serve an LLM across clouds at the lowest cost that meets your latency targets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(catalog_cli.app, name="catalog")


app.command("plan")(plan_command)
app.add_typer(spec_app, name="spec")


@app.command()
def version() -> None:
    """Print skybroker's version and the Python it runs on."""
    typer.echo(f"skybroker {__version__} (Python {platform.python_version()}, {sys.platform})")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
