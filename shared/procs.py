"""Child processes, stopped the way a service manager stops them."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys


def stop_process(proc: subprocess.Popen[bytes], *, grace_s: float = 15.0) -> int | None:
    """SIGTERM, wait up to `grace_s` for a clean exit, then SIGKILL; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def die_with_parent() -> None:
    """A `preexec_fn` for helper processes (an embedded broker): Linux sends them SIGTERM when
    the thread that started them ends (the process dying, even by SIGKILL), so none is left
    behind. Start them from a thread that lives as long as they should: the main one."""
    if sys.platform != "linux":
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
