"""`tidegate agent`: the device-side commands bench engineers and boot scripts run."""

import json
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.device import DeviceConfig, DeviceRoot
from agent.engine import Agent, InstallReport, ProgressFn
from agent.errors import AgentError

app = typer.Typer(
    help="The device agent: provision, install, status, rollback, recover.", no_args_is_help=True
)

DEFAULT_ROOT = Path("/var/lib/tidegate")
Root = Annotated[Path, typer.Option("--root", help="Device root directory.")]


def _progress() -> ProgressFn:
    """Progress on stderr: a line per phase and per 10 %, at most five lines a second."""
    last: dict[str, Any] = {"phase": "", "pct": -10, "t": 0.0}

    def report(phase: str, done: int, total: int) -> None:
        pct = int(100 * done / total) if total else 100
        now = time.monotonic()
        new_phase = phase != last["phase"]
        if new_phase or pct == 100 or (pct >= last["pct"] + 10 and now - last["t"] > 0.2):
            if not new_phase and pct == last["pct"]:
                return
            typer.echo(f"  {phase}: {pct}% ({done}/{total} bytes)", err=True)
            last.update(phase=phase, pct=pct, t=now)

    return report


def _report(report: InstallReport) -> None:
    word = {"committed": "committed", "failed": "failed", "rolled_back": "rolled back"}[report.outcome.value]
    stream_err = not report.ok
    typer.echo(f"{word}: {report.reason}", err=stream_err)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def provision(
    device_id: Annotated[str, typer.Option(help="This device's id (its MQTT thing name).")],
    sku: Annotated[str, typer.Option(help="Hardware SKU.")],
    trusted_root: Annotated[Path, typer.Option(help="The update repository's root.json to trust.")],
    root: Root = DEFAULT_ROOT,
    max_trial_boots: Annotated[int, typer.Option(help="Restarts tolerated on trial before rollback.")] = 3,
    reserve_mb: Annotated[float, typer.Option(help="Disk space always left free.")] = 64.0,
) -> None:
    """Prepare a device root: identity, trusted root, two empty slots."""
    try:
        anchor = trusted_root.read_bytes()
    except OSError as exc:
        raise AgentError(f"{trusted_root}: cannot read trusted root ({exc.strerror})") from exc
    try:
        cfg = DeviceConfig(
            device_id=device_id, sku=sku, max_trial_boots=max_trial_boots, reserve_mb=reserve_mb
        )
    except ValueError as exc:
        raise AgentError(f"invalid device settings: {str(exc).splitlines()[-1].strip()}") from exc
    DeviceRoot.provision(root, cfg, anchor)
    typer.echo(f"provisioned {device_id} ({sku}) in {root}")


@app.command()
def install(
    repo: Annotated[str, typer.Option("--repo", help="Repository URL or directory.")],
    root: Root = DEFAULT_ROOT,
    target: Annotated[
        str | None, typer.Option(help="Target path, or a bundle name (newest for our SKU).")
    ] = None,
    bundle: Annotated[Path | None, typer.Option(help="A bundle file at hand (still verified).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Install into the inactive slot, flip, self-test; exit 0 only when committed."""
    agent = Agent(root, on_progress=None if quiet else _progress())
    _report(agent.install(repository=repo, target=target, bundle=bundle))


@app.command()
def status(
    root: Root = DEFAULT_ROOT,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Active slot, committed version per slot, install state and the last result with figures."""
    st = Agent(root).status()
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    typer.echo(f"{st['device_id']} ({st['sku']}), agent {st['agent_version']}")
    typer.echo(f"  active: slot {st['active_slot'] or '-'} {st['active_version'] or ''}".rstrip())
    for name, slot in st["slots"].items():
        b = slot["bundle"]
        typer.echo(f"  slot {name}: {slot['status']}{' ' + b['name'] + ' ' + b['version'] if b else ''}")
    typer.echo(f"  state: {st['state']}")
    if st["last_result"]:
        lr = st["last_result"]
        typer.echo(f"  last: {lr['outcome']}: {lr['reason']}")


@app.command()
def verify(
    root: Root = DEFAULT_ROOT,
    repair: Annotated[
        bool, typer.Option(help="Switch to the other slot when it is good and verifies.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Check the active slot at rest against its signed manifest (every file's SHA-256); a
    damaged slot is marked invalid and, with --repair, the other good slot takes over. Exit
    0 when what is active verifies, 1 when the device must be reinstalled."""
    out = Agent(root).verify(repair=repair)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    elif out["ok"]:
        typer.echo(f"slot {out['active_slot']}: {out['reason']}")
    else:
        typer.echo(f"slot damaged at rest: {out['reason']}")
        if out["repaired"]:
            typer.echo(f"repaired: {out['repaired']}")
        else:
            typer.echo(
                f"not repaired: reinstall {out.get('reinstall')} (tidegate agent install --target ...)"
            )
    if not out["ok"] and not out["repaired"]:
        raise typer.Exit(1)


@app.command()
def rollback(root: Root = DEFAULT_ROOT) -> None:
    """Go back to the previous committed slot."""
    typer.echo(f"rolled back: {Agent(root).rollback().reason}")


@app.command()
def recover(root: Root = DEFAULT_ROOT) -> None:
    """What a boot runs: finish or undo whatever an interrupted install left."""
    report = Agent(root).recover()
    if report is None:
        typer.echo("nothing to recover")
        return
    typer.echo(f"recovered: {report.outcome.value}: {report.reason}")


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", help="agent.toml")],
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """The daemon: AWS IoT Jobs over MQTT, preconditions, installs, telemetry, thermal, batcher, health."""
    import asyncio
    import logging
    import signal

    from agent.config import AgentConfig
    from agent.runtime import AgentDaemon
    from shared.logs import configure_logging

    cfg = AgentConfig.load(config)
    # The same JSON lines as the fleet server and the gateway (time, level, logger, message),
    # redacted: one schema for everything a fleet's logs collect.
    configure_logging(getattr(logging, log_level.upper(), logging.INFO))

    async def main() -> None:
        daemon = AgentDaemon(cfg)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            # A stop must end the process: if anything hangs in shutdown, dump every thread's
            # stack (for the bug report) and exit rather than wait for systemd's SIGKILL.
            timer = threading.Timer(20.0, _hard_exit)
            timer.daemon = True
            timer.start()
            daemon.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        await daemon.run()

    asyncio.run(main())


def _hard_exit() -> None:
    import faulthandler
    import os

    sys.stderr.write("agent did not stop within 20 s; thread stacks follow\n")
    faulthandler.dump_traceback(all_threads=True)
    os._exit(3)
