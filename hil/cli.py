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


def _target(
    target: str,
    identity: Path | None,
    known_hosts: Path | None,
    remote_python: str,
    container: dict[str, Any] | None = None,
) -> Any:
    from hil.container import PREFIX, Bind, ContainerTarget, parse_memory_mb
    from hil.targets import target_for

    container = {k: v for k, v in (container or {}).items() if v}
    if target.startswith(PREFIX):
        return ContainerTarget.from_spec(
            target,
            python=remote_python,
            cpus=container.get("cpus"),
            memory_mb=parse_memory_mb(container["memory"]) if "memory" in container else None,
            cpuset=container.get("cpuset"),
            mounts=[Bind.parse(m) for m in container.get("mount", [])],
            engine=container.get("engine"),
            network=container.get("network", "none"),
        )
    if container:
        raise HilCommandError(
            f"--container-{next(iter(container))} is for a container:// target, not {target!r}"
        )
    ssh: dict[str, Any] = {"python": remote_python}
    if identity is not None:
        ssh["client_keys"] = [identity]
    if known_hosts is not None:
        ssh["known_hosts"] = known_hosts
    return target_for(target, **ssh) if target.startswith("ssh://") else target_for(target)


def _container(
    cpus: float | None,
    memory: str | None,
    cpuset: str | None,
    mounts: list[str] | None,
    engine: str | None,
    network: str,
) -> dict[str, Any]:
    """The --container-* options given (none for another kind of target)."""
    given: dict[str, Any] = {
        "cpus": cpus,
        "memory": memory,
        "cpuset": cpuset,
        "mount": mounts,
        "engine": engine,
    }
    if network != "none":
        given["network"] = network
    return given


def _print_checks(preflight: dict[str, Any], *, err: bool = False) -> None:
    for c in preflight["checks"]:
        typer.echo(f"  {'ok    ' if c['passed'] else 'FAILED'} {c['name']:<13} {c['detail']}", err=err)


async def _interruptible(work: Any, say: Any) -> Any:
    """Run `work` so that one Ctrl-C cancels it (the probe on the rig is killed, temp dirs
    removed, the partial report written) and further Ctrl-Cs only say it is stopping."""
    import signal

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    stopping: list[bool] = []

    def on_sigint() -> None:
        if not stopping:
            stopping.append(True)
            say("stopping: killing the probe on the rig and writing the partial report …")
            task.cancel()
        else:
            say("still stopping (a few seconds at most) …")

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await task
    finally:
        loop.remove_signal_handler(signal.SIGINT)


TargetOpt = Annotated[
    str,
    typer.Option(
        help="'local', ssh://[user@]host[:port] (user: yours, as ssh), or container://IMAGE (a rig in a "
        "container on a Docker-API engine: Docker, or podman system service)."
    ),
]
CpusOpt = Annotated[
    float | None, typer.Option("--container-cpus", help="CPU quota of a container rig (the SoC's cores).")
]
MemoryOpt = Annotated[
    str | None,
    typer.Option("--container-memory", help="Memory limit of a container rig, swap included (512m, 2g)."),
]
CpusetOpt = Annotated[
    str | None, typer.Option("--container-cpuset", help="Host CPUs a container rig may use (0-1).")
]
MountOpt = Annotated[
    list[str] | None,
    typer.Option("--container-mount", help="HOST:CONTAINER[:ro|rw] mounted into a container rig (repeat)."),
]
EngineOpt = Annotated[
    str | None,
    typer.Option(
        "--container-engine",
        help="The engine's API (unix:///run/podman/podman.sock); default DOCKER_HOST or Docker's socket.",
    ),
]
NetworkOpt = Annotated[
    str, typer.Option("--container-network", help="A container rig's network (none: no network).")
]
IdentityOpt = Annotated[Path | None, typer.Option(help="SSH private key.")]
KnownHostsOpt = Annotated[
    Path | None, typer.Option(help="SSH known_hosts file (default: ~/.ssh/known_hosts).")
]
RemotePythonOpt = Annotated[
    str, typer.Option(help="Python with Tidegate installed on the rig (see README: setting up a rig).")
]
ProbeOpt = Annotated[
    Path | None,
    typer.Option(
        help="A self-contained probe (`tidegate hil probe-package`) to run on the rig, not its Tidegate."
    ),
]
CatalogueOpt = Annotated[
    Path | None, typer.Option(help="SKU catalogue the rig is checked against (default config/skus.toml).")
]


@app.command("run")
def run_command(
    bundle: Annotated[Path, typer.Option(help="The bundle file to bench (on this, the bench host).")],
    target: TargetOpt = "local",
    suite: Annotated[str, typer.Option(help="smoke, full, or one suite's name.")] = "smoke",
    out: Annotated[Path, typer.Option(help="Directory for report.json, junit.xml and report.html.")] = Path(
        "hil-report"
    ),
    repo: Annotated[
        str | None,
        typer.Option(
            help="Update repository for the install cycle: a path ON THE RIG, or a URL the rig reaches."
        ),
    ] = None,
    trusted_root: Annotated[
        str | None,
        typer.Option(
            help="root.json ON THE RIG (default: REPO/metadata/1.root.json; needed with a URL --repo)."
        ),
    ] = None,
    sku: Annotated[str | None, typer.Option(help="SKU to bench (default: the bundle's first).")] = None,
    runs: Annotated[int, typer.Option(help="Timed runs for the latency suite.", min=10)] = 200,
    soak_s: Annotated[float, typer.Option(help="Thermal soak duration in seconds.", min=1)] = 30.0,
    thermal_root: Annotated[
        str | None,
        typer.Option(
            help="Thermal zones ON THE RIG (e.g. /sys/class/thermal); default: a simulated zone, "
            "named simulated in the report (the fleet server accepts that only for SKUs it allows)."
        ),
    ] = None,
    latency_budget_ms: Annotated[float | None, typer.Option(help="Override the bundle's p95 budget.")] = None,
    identity: IdentityOpt = None,
    known_hosts: KnownHostsOpt = None,
    remote_python: RemotePythonOpt = "python3",
    suite_timeout_s: Annotated[
        float, typer.Option(help="Longest a single suite may take; a hung one is killed and fails alone.")
    ] = 900.0,
    signing_key: Annotated[
        Path | None,
        typer.Option(
            help="The bench host's key (`tidegate hil keygen`): signs report.json.",
            envvar="TIDEGATE_BENCH_KEY",
        ),
    ] = None,
    catalogue: CatalogueOpt = None,
    probe: ProbeOpt = None,
    container_cpus: CpusOpt = None,
    container_memory: MemoryOpt = None,
    container_cpuset: CpusetOpt = None,
    container_mount: MountOpt = None,
    container_engine: EngineOpt = None,
    container_network: NetworkOpt = "none",
) -> None:
    """Run SUITE against TARGET and write the reports to OUT. A pre-flight checks the rig
    first (Tidegate there, its architecture and runtime against the SKU, thermal zones,
    the install suite's repository). Exit 0 only when every suite passed; 1 a suite failed;
    2 the run could not start or finish (the pre-flight failed, the rig was lost); 130
    interrupted."""
    from hil import runner
    from hil.report import NOT_STARTED, write_all
    from hil.targets import TargetError
    from shared.benchreport import load_private

    key = load_private(signing_key) if signing_key is not None else None
    tgt = _target(
        target,
        identity,
        known_hosts,
        remote_python,
        _container(
            container_cpus,
            container_memory,
            container_cpuset,
            container_mount,
            container_engine,
            container_network,
        ),
    )
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

    work = runner.run(
        report,
        manifest,
        bundle,
        tgt,
        progress=say,
        suite_timeout_s=suite_timeout_s,
        catalogue=catalogue,
        probe=probe,
    )
    try:
        asyncio.run(_interruptible(work, say))
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        report.incomplete_reason = report.incomplete_reason or "interrupted (Ctrl-C) before every suite ran"
        paths = write_all(report, out, key)
        typer.echo(f"interrupted: partial report (marked incomplete) in {paths[0].parent}", err=True)
        raise typer.Exit(130) from exc
    except runner.PreflightError as exc:
        paths = write_all(report, out, key)
        where = paths[0].parent
        kept = f"; the earlier report in {out} is kept" if where.name == NOT_STARTED else ""
        _print_checks(report.preflight, err=True)
        raise HilCommandError(f"{exc} (report marked not started in {where}{kept})") from exc
    except TargetError as exc:
        paths = write_all(report, out, key)
        raise HilCommandError(f"{exc} (report marked incomplete in {paths[0].parent})") from exc
    paths = write_all(report, out, key)
    for r in report.results:
        typer.echo(f"  {r.name:<12} {r.status:<8} {r.reason}")
    signed = " (signed)" if key is not None else " (unsigned: the fleet server will not accept it)"
    typer.echo(
        f"{'PASSED' if report.passed else 'FAILED'}: reports in {', '.join(str(p) for p in paths)}{signed}"
    )
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def doctor(
    target: TargetOpt = "local",
    sku: Annotated[str, typer.Option(help="The SKU the rig should stand for.")] = "edge-cpu",
    suite: Annotated[str, typer.Option(help="The plan to check the rig for.")] = "full",
    thermal_root: Annotated[str | None, typer.Option(help="Thermal zones on the rig.")] = None,
    repo: Annotated[str | None, typer.Option(help="Update repository, as the rig sees it.")] = None,
    trusted_root: Annotated[str | None, typer.Option(help="root.json on the rig.")] = None,
    identity: IdentityOpt = None,
    known_hosts: KnownHostsOpt = None,
    remote_python: RemotePythonOpt = "python3",
    catalogue: CatalogueOpt = None,
    probe: ProbeOpt = None,
    container_cpus: CpusOpt = None,
    container_memory: MemoryOpt = None,
    container_cpuset: CpusetOpt = None,
    container_mount: MountOpt = None,
    container_engine: EngineOpt = None,
    container_network: NetworkOpt = "none",
) -> None:
    """Check a rig without benching anything: the pre-flight alone. Exit 0 when the rig is
    fit to bench SKU with SUITE, 2 when it is not (each check says why)."""
    from hil import runner
    from hil.targets import TargetError

    if suite not in runner.PLANS:
        raise HilCommandError(f"no suite {suite!r}; suites: {', '.join(runner.PLANS)}")
    tgt = _target(
        target,
        identity,
        known_hosts,
        remote_python,
        _container(
            container_cpus,
            container_memory,
            container_cpuset,
            container_mount,
            container_engine,
            container_network,
        ),
    )
    options: dict[str, Any] = {
        "repo": repo,
        "trusted_root": trusted_root,
        "thermal": {"thermal_root": thermal_root} if thermal_root else {},
    }
    report = runner.Report(bundle={}, target=tgt.name, suite=suite, sku=sku, started_at="", options=options)

    async def check() -> bool:
        await tgt.connect()
        try:
            if probe is not None:
                report.probe = [await tgt.put(probe)]
            return await runner.preflight(report, tgt, catalogue=catalogue)
        finally:
            await tgt.close()

    try:
        ok = asyncio.run(check())
    except TargetError as exc:
        raise HilCommandError(str(exc)) from exc
    _print_checks(report.preflight)
    facts = report.rig
    if facts:
        limits = [f"{facts['cpu_limit']:g} CPUs"] if facts.get("cpu_limit") else []
        limits += [f"{facts['memory_limit_mb']:g} MB"] if facts.get("memory_limit_mb") else []
        typer.echo(
            f"rig: {facts.get('machine')}, {facts.get('os')}, {facts.get('cpu_model')} x{facts.get('cpus')}, "
            f"{facts.get('memory_mb')} MB, Python {facts.get('python')}, Tidegate {facts.get('tidegate')}"
            + (f"; cgroup limits {' and '.join(limits)}" if limits else "")
        )
    if not ok:
        raise HilCommandError(f"{tgt.name} is not fit to bench {sku} ({suite})")
    typer.echo(f"{tgt.name} is fit to bench {sku} ({suite})")


@app.command("probe-package")
def probe_package(
    out: Annotated[Path, typer.Option(help="Where to write the zipapp.")] = Path("tidegate-probe.pyz"),
) -> None:
    """Write the self-contained probe: one file with the code a rig runs, for a rig whose
    Python has only the probe's packages (printed) rather than the whole distribution."""
    from hil.package import REQUIREMENTS, build_probe

    build_probe(out)
    typer.echo(f"{out}: run suites from it with --probe {out}")
    typer.echo("on the rig: python3 -m pip install " + " ".join(f"'{r}'" for r in REQUIREMENTS))


@app.command()
def keygen(
    out: Annotated[Path, typer.Option(help="Where to write the private key (0600; never overwritten).")],
) -> None:
    """A bench host's signing key. Give the printed public key to the fleet server
    (TIDEGATE_BENCH_KEYS='{"NAME": "KEY"}'), which then accepts reports signed with it."""
    from shared.benchreport import generate, key_id, public_text

    public = generate(out)
    typer.echo(f"private key: {out} (key id {key_id(public)})")
    typer.echo(public_text(public))


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
        raise HilCommandError(f"{report}: not a HIL report directory ({exc})") from exc
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
