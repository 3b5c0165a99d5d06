"""The `tidegate` command: each package owns its group; this module only mounts them
and turns deliberate errors into one line and a non-zero exit."""

import os
import sys
import traceback

import typer

from agent.cli import app as agent_app
from builder.cli import build_command, sample_model_command
from cloud_serving.cli import app as serve_app
from fleet_server.cli import app as server_app
from fleet_server.client.cli import app as fleet_app
from fleet_server.sim.cli import app as sim_app
from hil.cli import app as hil_app
from shared.bundle.cli import app as bundle_app
from shared.drift.cli import app as drift_app
from shared.errors import TidegateError
from shared.trust.cli import app as repo_app
from tidegate import __version__
from tidegate.demo import app as demo_app
from tidegate.envcheck import unknown_variables

try:  # recent Typer vendors click; older ones used click itself
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import NoArgsIsHelpError, UsageError  # type: ignore[assignment]

app = typer.Typer(
    name="tidegate",
    help="Ship ML models safely to fleets of vehicles, edge devices and cloud endpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(agent_app, name="agent")
app.add_typer(repo_app, name="repo")
app.add_typer(server_app, name="server")
app.add_typer(fleet_app, name="fleet")
app.add_typer(sim_app, name="sim")
app.add_typer(bundle_app, name="bundle")
app.add_typer(demo_app, name="demo")
app.command("build")(build_command)
app.command("sample-model")(sample_model_command)
app.add_typer(serve_app, name="serve")
app.add_typer(hil_app, name="hil")
app.add_typer(drift_app, name="drift")

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tidegate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.", envvar="TIDEGATE_DEBUG"),
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version, is_eager=True
    ),
) -> None:
    """Ship ML models safely to fleets of vehicles, edge devices and cloud endpoints."""
    _state["debug"] = debug


def main(argv: list[str] | None = None) -> int:
    """Entry point: one clear line on error (traceback only with --debug), non-zero exit.

    Usage errors and --help are handled by Typer (exit 2 and 0); a deliberate
    `TidegateError` from any command ends here.
    """
    args = sys.argv[1:] if argv is None else argv
    for line in unknown_variables(os.environ):
        typer.echo(f"warning: {line}", err=True)
    try:
        code = app(args=args, prog_name="tidegate", standalone_mode=False)
    except NoArgsIsHelpError as exc:  # a bare group: its help, as before
        exc.show()
        return exc.exit_code
    except UsageError as exc:  # one line, as every other error, not a box
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        typer.echo(f"error: {exc.format_message()}{hint}", err=True)
        return exc.exit_code
    except typer.Abort:
        typer.echo("error: interrupted", err=True)
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except TidegateError as exc:
        if _state["debug"] or "--debug" in args:
            traceback.print_exc()
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    return code if isinstance(code, int) else 0
