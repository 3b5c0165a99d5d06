"""A real container engine for the container rig's tests: podman's Docker-compatible API
(`podman system service`) on a socket of its own, with its own image store.

This machine has no registry to pull a Python image from, so the rig's image is built here:
an empty root (merged-/usr links, mount points) imported as an image, run with this host's
/usr, /etc and Python bind-mounted read-only. The probe is the self-contained zipapp, so
nothing of the checkout is in the container; the limits are the engine's real cgroups.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PODMAN = shutil.which("podman")
RUNC = shutil.which("runc")
IMAGE = "localhost/tidegate-hil-host:test"


def _conf(d: Path) -> Path:
    """runc, not Debian's crun 1.8 (which refuses hybrid cgroup v1/v2 hosts such as this one),
    and file/process limits within this process's hard limits (podman's defaults exceed them
    in a container that cannot raise its own)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)

    def cap(limit: tuple[int, int], want: int) -> str:
        hard = limit[1] if limit[1] != resource.RLIM_INFINITY else want
        return f"{min(want, hard)}:{min(want, hard)}"

    conf = d / "containers.conf"
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={cap(nofile, 4096)}", "nproc={cap(nproc, 4096)}"]\n'
        "[engine]\n"
        f'runtime = "{RUNC or "runc"}"\n'
    )
    return conf


@contextlib.contextmanager
def podman_engine(d: Path) -> Iterator[str]:
    """`podman system service` on `d/podman.sock` with its store under `d`; its URL."""
    assert PODMAN is not None
    # podman refuses a run root longer than 50 characters (pytest's temp paths are longer)
    short = Path(tempfile.mkdtemp(prefix="tg-podman-", dir="/tmp"))
    sock = short / "podman.sock"
    env = {**os.environ, "CONTAINERS_CONF": str(_conf(d))}
    log = (d / "podman.log").open("wb")
    proc = subprocess.Popen(
        [
            PODMAN,
            "--root",
            str(d / "storage"),
            "--runroot",
            str(short / "run"),
            "--storage-driver",
            "vfs",
            "system",
            "service",
            "--time=0",
            f"unix://{sock}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if sock.exists():
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"podman system service exited: {(d / 'podman.log').read_text()[-2000:]}")
            time.sleep(0.1)
        else:
            raise RuntimeError("podman system service did not open its socket in 30 s")
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
        log.close()
        # podman 4.3 with its own --root leaves each removed container's /dev/shm tmpfs
        # mounted under the store; unmount them so the temp directory can go.
        for line in Path("/proc/self/mounts").read_text().splitlines():
            point = line.split()[1]
            if point.startswith((str(d) + "/", str(short) + "/")):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        shutil.rmtree(short, ignore_errors=True)


def host_tree_image(url: str) -> str:
    """Import the empty root as IMAGE on the engine at `url`; its name."""
    import docker

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("usr", "etc", "tmp", "proc", "sys", "dev", "root", "run", "var/tmp", "work"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name in ("tmp", "var/tmp") else 0o755
            tar.addfile(info)
        for link in ("bin", "lib", "lib64", "sbin"):
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, f"usr/{link}"
            tar.addfile(info)
    client = docker.DockerClient(base_url=url, timeout=60)
    try:
        # An entrypoint that exits, as a server image's would not idle: the rig must not run it.
        answer = client.api.import_image_from_data(buf.getvalue(), changes=['ENTRYPOINT ["/usr/bin/false"]'])
        image_id = json.loads(answer.strip().splitlines()[-1])["id"]
        repository, tag = IMAGE.rsplit(":", 1)
        client.images.get(image_id).tag(repository, tag)
    finally:
        client.close()
    return IMAGE


def host_mounts() -> list[str]:
    """What the host-tree image needs bind-mounted (read-only) to run this Python."""
    paths = {"/usr", "/etc", sys.base_prefix, sys.prefix}
    # The venv's interpreter may be a link into another tree (pyenv): mount where it leads.
    paths.add(str(Path(sys.executable).resolve().parent.parent))
    keep = sorted(p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths))
    return [f"{p}:{p}:ro" for p in keep]


def rig_containers(url: str) -> list[str]:
    """The ids of the containers the bench labelled as rigs, running or not."""
    import docker

    client = docker.DockerClient(base_url=url, timeout=30)
    try:
        return [c.id for c in client.containers.list(all=True, filters={"label": "tidegate.hil"})]
    finally:
        client.close()
