"""The `skybroker` command line (typer).

Sub-command groups live in their own modules and are added here. Heavy imports (torch,
SkyPilot, cloud SDKs, pulp) stay inside the command functions so `skybroker --help` is fast.
"""

from __future__ import annotations

import platform
import sys

import typer
from typer.core import TyperOption

from skybroker import __version__, catalog_cli
from skybroker.deploy_cli import register as register_deploy_commands
from skybroker.plan_cli import plan_command, spec_app
from skybroker.profile_cli import profile_command

app = typer.Typer(
    name="skybroker",
    help="Serve an LLM across clouds at the lowest cost that meets your latency targets.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish)
    pretty_exceptions_enable=False,
)


_display_type_rich = TyperOption.display_type_rich


def _flag_without_type(self: TyperOption, ctx: typer.Context) -> str | None:
    """A flag takes no value: its help line shows no `<bool>` type (typer prints one)."""
    return None if self.is_flag else _display_type_rich(self, ctx)


TyperOption.display_type_rich = _flag_without_type  # type: ignore[method-assign]


@app.callback()
def _root() -> None:
    """Serve an LLM across clouds at the lowest cost that meets your latency targets."""


app.command("plan")(plan_command)
app.add_typer(catalog_cli.app, name="catalog")
app.add_typer(spec_app, name="spec")
app.command("profile")(profile_command)


@app.command()
def version() -> None:
    """Print skybroker's version and the Python it runs on."""
    typer.echo(f"skybroker {__version__} (Python {platform.python_version()}, {sys.platform})")


register_deploy_commands(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
