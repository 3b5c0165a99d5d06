"""Where suites run: this machine, or a rig over SSH. One narrow interface (`Target`):
copy a file there, run a command there with a timeout, streaming its stderr lines.

The command is the probe of the Tidegate installed on the target (`python -m hil.probe`),
so a rig needs the agent's distribution and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from shared.errors import TidegateError


class TargetError(TidegateError):
    """The target cannot be reached or a command could not run there."""

    exit_code = 2


class TargetTimeoutError(TargetError):
    """A command did not finish within its time and was killed (the target is still there)."""


KILL_GRACE_S = 1.0  # how long stopping a command on the target may take, on Ctrl-C or a timeout


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


LineFn = Callable[[str], None]


class Target(Protocol):
    name: str
    workdir: str  # scratch space on the target, removed by `close`

    async def connect(self) -> None: ...

    async def put(self, local: Path) -> str:
        """Copy `local` to the target's work directory; its path there."""
        ...

    async def run(self, argv: list[str], *, timeout_s: float, on_stderr: LineFn | None = None) -> Completed:
        """Run `argv` there. Raises `TargetTimeoutError` (the command killed) when it does not
        finish in time, `TargetError` when it cannot run; a cancelled run kills it too."""
        ...

    async def close(self) -> None: ...


async def _pump(stream: asyncio.StreamReader | None, sink: list[str], on_line: LineFn | None) -> None:
    if stream is None:
        return
    async for raw in stream:
        line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        sink.append(line)
        if on_line is not None:
            on_line(line.rstrip("\n"))


async def _drain(proc: Any, out: list[str], err: list[str], on_stderr: LineFn | None) -> None:
    """Both streams to their ends and the exit: one coroutine, so a timeout or a Ctrl-C
    cancels it as a whole (no gathered future left with an unread cancellation)."""
    await asyncio.gather(_pump(proc.stdout, out, None), _pump(proc.stderr, err, on_stderr), proc.wait())


class LocalTarget:
    """This machine: a device root's worth of scratch space and this Python."""

    def __init__(self, python: str = sys.executable) -> None:
        self.name, self.python = "local", python
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.workdir = ""

    async def connect(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="tidegate-hil-target-")
        self.workdir = self._tmp.name

    async def put(self, local: Path) -> str:
        assert self._tmp is not None, "connect first"
        dest = Path(self._tmp.name) / local.name
        await asyncio.to_thread(shutil.copyfile, local, dest)
        return str(dest)

    async def run(self, argv: list[str], *, timeout_s: float, on_stderr: LineFn | None = None) -> Completed:
        argv = [self.python if a == "{python}" else a for a in argv]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [_project_root(), os.environ.get("PYTHONPATH")])),
        }
        # Its own process group: a timeout or Ctrl-C kills the probe and whatever it started
        # (the self-test child of the install suite), not just the first process.
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        out: list[str] = []
        err: list[str] = []
        try:
            await asyncio.wait_for(_drain(proc, out, err, on_stderr), timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), KILL_GRACE_S)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise TargetTimeoutError(
                f"local: {' '.join(argv[1:4])} did not finish within {timeout_s:g} s and was killed"
            ) from exc
        return Completed(proc.returncode or 0, "".join(out), "".join(err))

    async def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _project_root() -> str:
    """So that `python -m hil.probe` finds this checkout when it is not installed."""
    return str(Path(__file__).resolve().parent.parent)


class SshTarget:
    """A rig over SSH (asyncssh): the bundle goes over SFTP, suites run as commands there."""

    def __init__(
        self,
        host: str,
        *,
        port: int = 22,
        username: str | None = None,
        client_keys: list[Path] | None = None,
        known_hosts: Path | None = None,
        python: str = "python3",
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.host, self.port, self.username = host, port, username
        self.client_keys, self.known_hosts, self.python = client_keys, known_hosts, python
        self.connect_timeout_s = connect_timeout_s
        if not username:  # as ssh does: the local user
            import getpass

            username = getpass.getuser()
        self.username = username
        self.name = f"ssh://{username}@{host}:{port}"
        self._conn: Any = None
        self.workdir = ""

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> SshTarget:
        u = urlparse(url)
        if u.scheme != "ssh" or not u.hostname:
            raise TargetError(f"{url!r}: an SSH target looks like ssh://user@host[:port]")
        return cls(u.hostname, port=u.port or 22, username=u.username, **kwargs)  # type: ignore[arg-type]

    async def connect(self) -> None:
        await self._open()
        done = await self.run(["mktemp", "-d", "/tmp/tidegate-hil-XXXXXX"], timeout_s=30)
        if done.returncode != 0:
            raise TargetError(f"{self.name}: cannot make a work directory: {done.stderr.strip()}")
        self.workdir = done.stdout.strip()

    async def _open(self) -> None:
        try:
            import asyncssh
        except ImportError as exc:
            raise TargetError("an SSH target needs asyncssh: pip install 'tidegate[hil]'") from exc
        options: dict[str, Any] = {}
        if self.known_hosts is not None:  # otherwise asyncssh's default: ~/.ssh/known_hosts
            options["known_hosts"] = str(self.known_hosts)
        try:
            self._conn = await asyncio.wait_for(
                asyncssh.connect(
                    self.host,
                    port=self.port,
                    username=self.username,
                    client_keys=[str(k) for k in self.client_keys] if self.client_keys else None,
                    **options,
                ),
                self.connect_timeout_s,
            )
        except TimeoutError as exc:
            raise TargetError(f"{self.name}: no answer within {self.connect_timeout_s:g} s") from exc
        except asyncssh.HostKeyNotVerifiable as exc:
            raise TargetError(
                f"{self.name}: cannot connect: the host key of {self.host} port {self.port} is not known "
                f"or has changed ({exc}); check it, then add it: ssh-keyscan -p {self.port} {self.host} "
                f">> {self.known_hosts or '~/.ssh/known_hosts'}"
            ) from exc
        except asyncssh.PermissionDenied as exc:
            raise TargetError(
                f"{self.name}: cannot connect: {self.username} was refused at {self.host} port {self.port} "
                "(give the key with --identity)"
            ) from exc
        except socket.gaierror as exc:
            raise TargetError(
                f"{self.name}: cannot connect: no such host {self.host!r} ({exc.strerror})"
            ) from exc
        except ConnectionRefusedError as exc:
            raise TargetError(
                f"{self.name}: cannot connect: nothing listens on {self.host} port {self.port}"
            ) from exc
        except (OSError, asyncssh.Error) as exc:
            raise TargetError(f"{self.name}: cannot connect to {self.host} port {self.port}: {exc}") from exc

    async def put(self, local: Path) -> str:
        import asyncssh

        remote = f"{self.workdir}/{local.name}"
        for attempt in (1, 2):  # a rig's link drops now and then: reconnect and copy again, once
            try:
                async with self._conn.start_sftp_client() as sftp:
                    await sftp.put(str(local), remote)
                return remote
            except (OSError, asyncssh.Error) as exc:
                lost = isinstance(exc, asyncssh.ConnectionLost | asyncssh.ChannelOpenError | ConnectionError)
                if attempt == 2 or not lost:
                    raise TargetError(f"{self.name}: cannot copy {local.name}: {exc}") from exc
                await self._open()
        raise AssertionError("unreachable")

    async def run(self, argv: list[str], *, timeout_s: float, on_stderr: LineFn | None = None) -> Completed:
        import asyncssh

        if self._conn is None:
            raise TargetError(f"{self.name}: not connected")
        command = shlex.join([self.python if a == "{python}" else a for a in argv])
        # The command announces its pid first, so a timeout or a Ctrl-C can kill it (and its
        # children) over another channel: closing a channel does not stop a quiet process.
        wrapped = f"echo {PID_MARK}$$ >&2; exec {command}"
        pid: list[str] = []

        def lines(line: str) -> None:
            if not pid and line.startswith(PID_MARK):
                pid.append(line.removeprefix(PID_MARK).strip())
            elif on_stderr is not None:
                on_stderr(line)

        out: list[str] = []
        err: list[str] = []
        proc: Any = None
        try:
            proc = await self._conn.create_process(wrapped)
            await asyncio.wait_for(_drain(proc, out, err, lines), timeout_s)
            code = proc.exit_status
        except (TimeoutError, asyncio.CancelledError) as exc:
            await self._kill(pid[0] if pid else None)
            if proc is not None:
                proc.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise TargetTimeoutError(
                f"{self.name}: {command[:80]} did not finish within {timeout_s:g} s and was killed"
            ) from exc
        except (OSError, asyncssh.Error) as exc:
            raise TargetError(f"{self.name}: {command[:80]}: {exc}") from exc
        if proc is not None:
            proc.close()
        err = [line for line in err if not line.startswith(PID_MARK)]
        return Completed(code if code is not None else 255, "".join(out), "".join(err))

    async def _kill(self, pid: str | None) -> None:
        """Kill a command and its children on the rig, within `KILL_GRACE_S`."""
        if pid is None or not pid.isdigit() or self._conn is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self._conn.run(
                    f"pkill -KILL -P {pid} 2>/dev/null; kill -KILL {pid} 2>/dev/null; true", check=False
                ),
                KILL_GRACE_S,
            )

    async def close(self) -> None:
        if self._conn is not None:
            if self.workdir:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self._conn.run(shlex.join(["rm", "-rf", self.workdir]), check=False), KILL_GRACE_S
                    )
            self._conn.close()
            self._conn = None


PID_MARK = "tidegate-probe-pid:"


def target_for(spec: str, **options: Any) -> Target:
    """`local`, `ssh://…` (options: SshTarget's) or `container://IMAGE` (options: ContainerTarget's)."""
    if spec == "local":
        return LocalTarget()
    if spec.startswith("ssh://"):
        return SshTarget.from_url(spec, **options)
    if spec.startswith("container://"):
        from hil.container import ContainerTarget

        return ContainerTarget.from_spec(spec, **options)
    raise TargetError(
        f"unknown target {spec!r}: use 'local', ssh://[user@]host[:port] or container://IMAGE[:TAG]"
    )
