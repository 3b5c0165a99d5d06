"""`tidegate hil run`: bench suites against a target, with reports; `tidegate hil upload`:
attach a report to its release in the fleet server, where it gates campaigns."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from shared.errors import TidegateError

app = typer.Typer(help="Hardware-in-the-loop bench suites and their reports.", no_args_is_help=True)


class HilCommandError(TidegateError):
    """A bench command that cannot do its job (the message says why)."""

    exit_code = 2  # 1 is a suite that failed


@app.command("run")
def run_command(
    bundle: Annotated[Path, typer.Option(help="The bundle file to bench.")],
    target: Annotated[str, typer.Option(help="'local' or ssh://user@host[:port].")] = "local",
    suite: Annotated[str, typer.Option(help="smoke, full, or one suite's name.")] = "smoke",
    out: Annotated[Path, typer.Option(help="Directory for report.json, junit.xml and report.html.")] = Path(
        "hil-report"
    ),
    repo: Annotated[
        str | None, typer.Option(help="Update repository (URL or directory) for the install cycle.")
    ] = None,
    trusted_root: Annotated[
        str | None, typer.Option(help="root.json on the target (default: REPO/metadata/1.root.json).")
    ] = None,
    sku: Annotated[str | None, typer.Option(help="SKU to bench (default: the bundle's first).")] = None,
    runs: Annotated[int, typer.Option(help="Timed runs for the latency suite.", min=10)] = 200,
    soak_s: Annotated[float, typer.Option(help="Thermal soak duration in seconds.", min=1)] = 30.0,
    thermal_root: Annotated[
        str | None,
        typer.Option(
            help="Thermal zones on the target (e.g. /sys/class/thermal); default: a simulated zone."
        ),
    ] = None,
    latency_budget_ms: Annotated[float | None, typer.Option(help="Override the bundle's p95 budget.")] = None,
    identity: Annotated[Path | None, typer.Option(help="SSH private key.")] = None,
    known_hosts: Annotated[
        Path | None, typer.Option(help="SSH known_hosts file (default: ~/.ssh/known_hosts).")
    ] = None,
    remote_python: Annotated[str, typer.Option(help="Python with Tidegate on an SSH target.")] = "python3",
    suite_timeout_s: Annotated[float, typer.Option(help="Longest a single suite may take.")] = 900.0,
) -> None:
    """Run SUITE against TARGET and write the reports to OUT; exit 0 only when every suite
    passed (1: a suite failed, 2: the run could not start or finish, 130: interrupted)."""
    from hil import runner
    from hil.report import write_all
    from hil.targets import TargetError, target_for

    ssh: dict[str, Any] = {"python": remote_python}
    if identity is not None:
        ssh["client_keys"] = [identity]
    if known_hosts is not None:
        ssh["known_hosts"] = known_hosts
    tgt = target_for(target, **ssh) if target.startswith("ssh://") else target_for(target)
    options: dict[str, Any] = {
        "repo": repo,
        "trusted_root": trusted_root,
        "sku": sku,
        "latency_budget_ms": latency_budget_ms,
        "latency": {"runs": runs},
        "thermal": {"soak_s": soak_s, **({"thermal_root": thermal_root} if thermal_root else {})},
    }
    report, manifest = runner.start(bundle, tgt, suite, options)
    typer.echo(
        f"benching {manifest.name} {manifest.version} ({report.sku}) on {tgt.name}: "
        f"{', '.join(runner.PLANS[suite])}",
        err=True,
    )

    def say(text: str) -> None:
        typer.echo(text, err=True)

    try:
        asyncio.run(runner.run(report, manifest, bundle, tgt, progress=say, suite_timeout_s=suite_timeout_s))
    except KeyboardInterrupt:
        report.incomplete_reason = "interrupted (Ctrl-C) before every suite ran"
        write_all(report, out)
        typer.echo(f"interrupted: partial report (marked incomplete) in {out}", err=True)
        raise typer.Exit(130) from None
    except TargetError as exc:
        write_all(report, out)
        raise HilCommandError(f"{exc} (report marked incomplete in {out})") from None
    paths = write_all(report, out)
    for r in report.results:
        typer.echo(f"  {r.name:<12} {r.status:<8} {r.reason}")
    typer.echo(f"{'PASSED' if report.passed else 'FAILED'}: reports in {', '.join(str(p) for p in paths)}")
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def upload(
    report: Annotated[Path, typer.Option(help="A report directory written by 'tidegate hil run'.")],
    server: Annotated[str, typer.Option(help="The fleet server's URL.")],
    token: Annotated[str, typer.Option(help="An operator token.", envvar="TIDEGATE_TOKEN")],
    timeout_s: Annotated[float, typer.Option(help="HTTP timeout.")] = 30.0,
) -> None:
    """Attach the report to its release for its SKU: a passing one lets campaigns start."""
    import httpx

    from hil.report import JSON_NAME, attach

    try:
        data = json.loads((report / JSON_NAME).read_text())
        name, version, sku = data["bundle"]["name"], data["bundle"]["version"], data["sku"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HilCommandError(f"{report}: not a HIL report directory ({exc})") from None
    if not data.get("complete"):
        raise HilCommandError(
            f"{report}: the report is incomplete ({data.get('incomplete_reason')}); rerun the bench"
        )
    with httpx.Client(
        base_url=server.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s
    ) as http:
        attached = attach(http, data)
    verdict = "passing" if data["passed"] else "failing"
    typer.echo(f"attached a {verdict} bench report to {name} {version} for {sku} (report {attached['id']})")
