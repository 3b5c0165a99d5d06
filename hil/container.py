"""A rig in a container: the probe runs in a container whose CPU and memory limits stand in
for a target SoC's, on any engine that speaks Docker's API (Docker, or podman's
`podman system service`), through the `docker` SDK.

The container lives for the whole run (started at `connect`, removed at `close`), idles on
`sleep`, and every suite is one `exec` in it, so the limits apply to the probe exactly as a
SoC's would: a model over the memory limit is killed by the kernel's OOM killer, and a CPU
quota slows the latency suite as fewer cores would. Nothing is pulled: the image must be on
the engine already (a bench is not the place to fetch code from a registry unasked).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import tarfile
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hil.targets import KILL_GRACE_S, PID_MARK, Completed, LineFn, TargetError, TargetTimeoutError

PREFIX = "container://"
LABEL = "tidegate.hil"  # every rig container carries it, so a crashed bench's leftovers can be found
KILLED = 137  # 128 + SIGKILL: what an exec killed by the OOM killer (or by a timeout) exits with


@dataclass(frozen=True)
class Bind:
    """A host directory mounted into the rig (read-only unless said): a toolchain or a
    repository the suites read where they run."""

    source: str
    target: str
    read_only: bool = True

    @classmethod
    def parse(cls, spec: str) -> Bind:
        parts = spec.split(":")
        mode_ok = len(parts) == 2 or (len(parts) == 3 and parts[2] in ("ro", "rw"))
        if not mode_ok or not all(parts[:2]):
            raise TargetError(f"--container-mount {spec!r}: give HOST:CONTAINER[:ro|rw]")
        if not os.path.isabs(parts[0]) or not os.path.isabs(parts[1]):
            raise TargetError(f"--container-mount {spec!r}: both paths must be absolute")
        return cls(parts[0], parts[1], len(parts) == 2 or parts[2] == "ro")


def parse_memory_mb(text: str) -> int:
    """`512m`, `2g`, `1536` (MiB): a container's memory limit in MiB."""
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = {"m": 1, "g": 1024}
    try:
        if value and value[-1] in scale:
            mb = float(value[:-1]) * scale[value[-1]]
        else:
            mb = float(value)
    except ValueError as exc:
        raise TargetError(f"--container-memory {text!r}: give MiB, or a size like 512m or 2g") from exc
    if mb < 6:  # the engines' own floor (Docker refuses less than 6 MiB)
        raise TargetError(f"--container-memory {text!r}: at least 6 MiB")
    return int(mb)


class ContainerTarget:
    """A rig in a container on a Docker-API engine (`container://IMAGE`)."""

    def __init__(
        self,
        image: str,
        *,
        cpus: float | None = None,
        memory_mb: int | None = None,
        cpuset: str | None = None,
        mounts: Sequence[Bind] = (),
        python: str = "python3",
        engine: str | None = None,
        network: str = "none",
        connect_timeout_s: float = 30.0,
    ) -> None:
        if not image:
            raise TargetError("a container target names its image: container://IMAGE[:TAG]")
        if cpus is not None and cpus <= 0:
            raise TargetError(f"--container-cpus {cpus:g}: give a positive number of CPUs")
        self.image, self.cpus, self.memory_mb, self.cpuset = image, cpus, memory_mb, cpuset
        self.mounts, self.python, self.network = tuple(mounts), python, network
        self.engine = engine or os.environ.get("DOCKER_HOST")
        self.connect_timeout_s = connect_timeout_s
        limits = [f"cpus={cpus:g}"] if cpus else []
        limits += [f"memory={memory_mb}m"] if memory_mb else []
        limits += [f"cpuset={cpuset}"] if cpuset else []
        self.name = PREFIX + image + (f" ({', '.join(limits)})" if limits else "")
        self.workdir = ""
        self._client: Any = None
        self._container: Any = None

    @classmethod
    def from_spec(cls, spec: str, **kwargs: Any) -> ContainerTarget:
        return cls(spec.removeprefix(PREFIX), **kwargs)

    # --- connect / close -------------------------------------------------------------------

    async def connect(self) -> None:
        await asyncio.to_thread(self._start)
        done = await self.run(["mktemp", "-d", "/tmp/tidegate-hil-XXXXXX"], timeout_s=30)
        if done.returncode != 0:
            raise TargetError(f"{self.name}: cannot make a work directory: {done.stderr.strip()}")
        self.workdir = done.stdout.strip()

    def _start(self) -> None:
        try:
            import docker
            from docker.errors import APIError, DockerException, ImageNotFound
        except ImportError as exc:
            raise TargetError(
                "a container target needs the docker SDK: pip install 'tidegate[docker]'"
            ) from exc
        where = self.engine or "the default engine (DOCKER_HOST unset)"
        try:
            client = (
                docker.DockerClient(base_url=self.engine, timeout=int(self.connect_timeout_s))
                if self.engine
                else docker.from_env(timeout=int(self.connect_timeout_s))
            )
            client.ping()
        except DockerException as exc:
            raise TargetError(
                f"{self.name}: cannot reach a container engine at {where}: {_first_line(exc)}; start one "
                "(podman system service --time=0 unix:///run/podman/podman.sock, or Docker) and set "
                "DOCKER_HOST or --container-engine"
            ) from exc
        self._client = client
        try:
            client.images.get(self.image)
        except ImageNotFound as exc:
            raise TargetError(
                f"{self.name}: no image {self.image!r} on the engine at {where}: build or pull it there "
                "first (the bench does not pull)"
            ) from exc
        except DockerException as exc:
            raise TargetError(f"{self.name}: cannot inspect {self.image!r}: {_first_line(exc)}") from exc
        limits: dict[str, Any] = {}
        if self.cpus:
            limits["nano_cpus"] = int(self.cpus * 1e9)
        if self.memory_mb:
            # Swap counted in: a SoC without swap is killed at its memory, not slowed past it.
            limits["mem_limit"] = limits["memswap_limit"] = f"{self.memory_mb}m"
        if self.cpuset:
            limits["cpuset_cpus"] = self.cpuset
        try:
            self._container = client.containers.run(
                self.image,
                ["infinity"],
                # Explicit: an empty entrypoint means "the image's" to some engines (podman's
                # compat API), and an image whose entrypoint is a server would run it instead.
                entrypoint=["sleep"],
                detach=True,
                network_mode=self.network,
                labels={LABEL: "rig"},
                mounts=[
                    docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only)
                    for m in self.mounts
                ],
                **limits,
            )
        except (APIError, DockerException) as exc:
            raise TargetError(f"{self.name}: the engine would not start the rig: {_first_line(exc)}") from exc

    async def close(self) -> None:
        container, client = self._container, self._client
        self._container = self._client = None
        if container is not None:
            with contextlib.suppress(Exception):  # already gone: nothing left to remove
                await asyncio.to_thread(container.remove, force=True)
        if client is not None:
            client.close()

    # --- put / run -------------------------------------------------------------------------

    async def put(self, local: Path) -> str:
        if self._container is None:
            raise TargetError(f"{self.name}: not connected")
        remote = f"{self.workdir}/{local.name}"
        try:
            await asyncio.to_thread(self._put, local)
        except OSError as exc:
            raise TargetError(f"{self.name}: cannot copy {local.name}: {exc}") from exc
        return remote

    def _put(self, local: Path) -> None:
        from docker.errors import DockerException

        with tempfile.TemporaryFile() as buf:  # a bundle can be large: spooled to disk, not memory
            with tarfile.open(fileobj=buf, mode="w") as tar:
                tar.add(str(local), arcname=local.name, recursive=False)
            buf.seek(0)
            try:
                ok = self._container.put_archive(self.workdir, buf)
            except DockerException as exc:
                raise TargetError(f"{self.name}: cannot copy {local.name}: {_first_line(exc)}") from exc
        if not ok:
            raise TargetError(f"{self.name}: the engine refused {local.name}")

    async def run(self, argv: list[str], *, timeout_s: float, on_stderr: LineFn | None = None) -> Completed:
        if self._container is None:
            raise TargetError(f"{self.name}: not connected")
        command = shlex.join([self.python if a == "{python}" else a for a in argv])
        # As over SSH: the command says its pid first, so a timeout can kill it with another exec.
        wrapped = ["sh", "-c", f"echo {PID_MARK}$$ >&2; exec {command}"]
        loop = asyncio.get_running_loop()
        pid: list[str] = []
        stop = threading.Event()

        def line(text: str) -> None:
            if not pid and text.startswith(PID_MARK):
                pid.append(text.removeprefix(PID_MARK).strip())
            elif on_stderr is not None:
                loop.call_soon_threadsafe(on_stderr, text)

        work = asyncio.ensure_future(asyncio.to_thread(self._exec, wrapped, line, stop))
        try:
            code, out, err = await asyncio.wait_for(asyncio.shield(work), timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            stop.set()
            await self._kill(pid[0] if pid else None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(work, KILL_GRACE_S * 5)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise TargetTimeoutError(
                f"{self.name}: {command[:80]} did not finish within {timeout_s:g} s and was killed"
            ) from exc
        if code == KILLED and self.memory_mb:
            oom = await self._oom_kills()
            if oom:
                note = (
                    f"killed by the kernel's OOM killer: over the rig's memory limit of {self.memory_mb} MiB "
                    f"({oom} OOM kill(s) in the container so far)"
                )
                err += note + "\n"
                if on_stderr is not None:
                    on_stderr(note)
        return Completed(code, out, err)

    def _exec(self, argv: list[str], line: Any, stop: threading.Event) -> tuple[int, str, str]:
        from docker.errors import DockerException

        api = self._client.api
        out: list[bytes] = []
        err: list[str] = []
        pending = b""
        try:
            handle = api.exec_create(self._container.id, argv, stdout=True, stderr=True)
            for chunk_out, chunk_err in api.exec_start(handle["Id"], stream=True, demux=True):
                if chunk_out:
                    out.append(chunk_out)
                if chunk_err:
                    pending += chunk_err
                    *whole, pending = pending.split(b"\n")
                    for raw in whole:
                        text = raw.decode(errors="replace")
                        if not text.startswith(PID_MARK):
                            err.append(text + "\n")
                        line(text)
                if stop.is_set():
                    break
            if pending:
                text = pending.decode(errors="replace")
                err.append(text)
                line(text)
            code = api.exec_inspect(handle["Id"]).get("ExitCode")
        except DockerException as exc:
            raise TargetError(f"{self.name}: {shlex.join(argv)[:80]}: {self._why(exc)}") from exc
        return (code if code is not None else 255), b"".join(out).decode(errors="replace"), "".join(err)

    def _why(self, exc: BaseException) -> str:
        """An exec that failed: say so plainly when it is because the container has stopped."""
        with contextlib.suppress(Exception):
            self._container.reload()
            state = self._container.attrs.get("State", {})
            if state.get("Status") != "running":
                oom = " (OOM-killed)" if state.get("OOMKilled") else ""
                return f"the rig's container is {state.get('Status')}, exit {state.get('ExitCode')}{oom}"
        return _first_line(exc)

    async def _kill(self, pid: str | None) -> None:
        """Kill a command and its children in the rig, within `KILL_GRACE_S`."""
        if pid is None or not pid.isdigit() or self._container is None:
            return
        script = f"pkill -KILL -P {pid} 2>/dev/null; kill -KILL {pid} 2>/dev/null; true"
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.to_thread(self._container.exec_run, ["sh", "-c", script]), KILL_GRACE_S * 5
            )

    async def _oom_kills(self) -> int:
        """The container's OOM kill count (cgroup v2 `memory.events`, or v1 `memory.oom_control`)."""
        script = (
            "cat /sys/fs/cgroup/memory.events 2>/dev/null || cat /sys/fs/cgroup/memory/memory.oom_control"
        )
        try:
            done = await asyncio.to_thread(self._container.exec_run, ["sh", "-c", script])
        except Exception:
            return 0
        for text in done.output.decode(errors="replace").splitlines():
            key, _, value = text.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
