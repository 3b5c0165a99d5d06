"""CrashFS: a FUSE file system that knows which writes a power cut would keep.

Every file keeps two versions of its bytes: what readers see now, and what was last made
durable by ``fsync`` on it. Every directory keeps two versions of its entries: now, and as of
its last ``fsync``. A power cut keeps the durable versions only, the strictest reading of
POSIX (and what ext4 with ``data=writeback``, or a drive that lies about its cache, can do):
a file written but not synced is lost or empty; a rename whose directory was not synced did
not happen; a new file whose directory was not synced does not exist.

The durable state changes only at an fsync, so the crash states of a run are exactly the
durable state after each fsync (a cut anywhere between two fsyncs leaves the same bytes).
CrashFS records one after every fsync (``record``) and writes any of them out as an
ordinary directory tree (``materialize``), where the code under test then recovers. This is
ALICE's idea (replay every crash state the ordering allows) with the kernel in the loop: the
program runs unmodified on a real mount, through real system calls.

Run as a process: ``python -m tests.crashfs MOUNTPOINT CONTROL_SOCKET``; `CrashFSClient`
starts, drives and unmounts it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DurableTree = dict[str, Any]  # name -> ("file", bytes, mode) | ("link", target) | ("dir", DurableTree, mode)


@dataclass(eq=False)
class Node:
    kind: str  # "file" | "dir" | "link"
    mode: int
    data: bytearray = field(default_factory=bytearray)
    durable_data: bytes = b""
    durable_mode: int = 0
    entries: dict[str, Node] = field(default_factory=dict)
    durable_entries: dict[str, Node] = field(default_factory=dict)
    target: str = ""
    mtime: float = field(default_factory=time.time)

    def durable(self) -> Any:
        if self.kind == "file":
            return ("file", self.durable_data, self.durable_mode)
        if self.kind == "link":
            return ("link", self.target)
        return ("dir", {n: c.durable() for n, c in self.durable_entries.items()}, self.durable_mode)


def _fuse_error(code: int) -> Exception:
    import mfusepy

    return mfusepy.FuseOSError(code)


class CrashFS:
    """The mfusepy operations (path-based, single-threaded)."""

    use_ns = True

    def __init__(self) -> None:
        self.root = Node("dir", stat.S_IFDIR | 0o755, durable_mode=stat.S_IFDIR | 0o755)
        self.handles: dict[int, Node] = {}
        self.next_fh = 1
        self.recording = False
        self.states: list[DurableTree] = []
        self.fsyncs = 0
        self._mutex = threading.Lock()
        self.failing = False

    # ---- control ------------------------------------------------------------------------

    def load(self, src: Path) -> None:
        """Replace everything with the tree at `src`, all of it durable."""

        def build(path: Path) -> Node:
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                return Node("link", stat.S_IFLNK | 0o777, target=os.readlink(path))
            if stat.S_ISDIR(st.st_mode):
                node = Node("dir", st.st_mode, durable_mode=st.st_mode)
                for child in sorted(path.iterdir()):
                    node.entries[child.name] = build(child)
                node.durable_entries = dict(node.entries)
                return node
            data = path.read_bytes()
            return Node("file", st.st_mode, bytearray(data), data, st.st_mode)

        with self._mutex:
            self.root = build(src)
            self.handles.clear()
            self.states = []
            self.fsyncs = 0
            self.recording = False

    def _record(self) -> None:
        self.fsyncs += 1
        if self.recording:
            self.states.append(self.root.durable()[1])

    def materialize(self, index: int, dest: Path) -> None:
        """Write crash state `index` (-1: the durable state now) as a real tree at `dest`."""
        tree = self.root.durable()[1] if index == -1 else self.states[index]

        def write(into: Path, entries: DurableTree) -> None:
            for name, item in entries.items():
                p = into / name
                if item[0] == "dir":
                    p.mkdir()
                    write(p, item[1])
                    os.chmod(p, stat.S_IMODE(item[2]))
                elif item[0] == "link":
                    os.symlink(item[1], p)
                else:
                    p.write_bytes(item[1])
                    os.chmod(p, stat.S_IMODE(item[2]))

        dest.mkdir(parents=True)
        write(dest, tree)

    # ---- lookup -------------------------------------------------------------------------

    def _lookup(self, path: str) -> Node:
        node = self.root
        for part in [p for p in path.split("/") if p]:
            if node.kind != "dir" or part not in node.entries:
                raise _fuse_error(errno.ENOENT)
            node = node.entries[part]
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._lookup(head or "/")
        if parent.kind != "dir":
            raise _fuse_error(errno.ENOTDIR)
        return parent, name

    def _handle(self, node: Node) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = node
        return fh

    def _node(self, path: str, fh: int | None) -> Node:
        if fh and fh in self.handles:
            return self.handles[fh]
        return self._lookup(path)

    # ---- operations ---------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        with self._mutex:
            n = self._node(path, fh)
            size = len(n.data) if n.kind == "file" else len(n.target) if n.kind == "link" else 4096
            ns = int(n.mtime * 1e9)
            return {
                "st_mode": n.mode,
                "st_nlink": 2 if n.kind == "dir" else 1,
                "st_size": size,
                "st_uid": os.getuid(),
                "st_gid": os.getgid(),
                "st_atime": ns,
                "st_mtime": ns,
                "st_ctime": ns,
                "st_blocks": (size + 511) // 512,
            }

    def readdir(self, path: str, fh: int) -> list[str]:
        with self._mutex:
            return [".", "..", *self._node(path, fh).entries]

    def opendir(self, path: str) -> int:
        with self._mutex:
            n = self._lookup(path)
            if n.kind != "dir":
                raise _fuse_error(errno.ENOTDIR)
            return self._handle(n)

    def releasedir(self, path: str, fh: int) -> int:
        with self._mutex:
            self.handles.pop(fh, None)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        with self._mutex:
            n = self._node(path, fh)
            n.durable_entries = dict(n.entries)
            n.durable_mode = n.mode
            self._record()
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        with self._mutex:
            parent, name = self._parent(path)
            if name in parent.entries:
                raise _fuse_error(errno.EEXIST)
            parent.entries[name] = Node("dir", stat.S_IFDIR | mode)
            parent.mtime = time.time()
        return 0

    def rmdir(self, path: str) -> int:
        with self._mutex:
            parent, name = self._parent(path)
            n = parent.entries.get(name)
            if n is None:
                raise _fuse_error(errno.ENOENT)
            if n.entries:
                raise _fuse_error(errno.ENOTEMPTY)
            del parent.entries[name]
        return 0

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self._mutex:
            parent, name = self._parent(path)
            n = parent.entries.get(name)
            if n is None:
                n = Node("file", stat.S_IFREG | (mode & 0o7777), durable_mode=stat.S_IFREG | (mode & 0o7777))
                parent.entries[name] = n
            else:
                n.data = bytearray()
            return self._handle(n)

    def open(self, path: str, flags: int) -> int:
        with self._mutex:
            n = self._lookup(path)
            if flags & os.O_TRUNC:
                n.data = bytearray()
            return self._handle(n)

    def release(self, path: str, fh: int) -> int:
        with self._mutex:
            self.handles.pop(fh, None)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._mutex:
            return bytes(self._node(path, fh).data[offset : offset + size])

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._mutex:
            n = self._node(path, fh)
            if offset > len(n.data):
                n.data.extend(b"\0" * (offset - len(n.data)))
            n.data[offset : offset + len(data)] = data
            n.mtime = time.time()
            return len(data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self._mutex:
            n = self._node(path, fh)
            if length < len(n.data):
                del n.data[length:]
            else:
                n.data.extend(b"\0" * (length - len(n.data)))
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self._mutex:
            n = self._node(path, fh)
            n.durable_data = bytes(n.data)
            n.durable_mode = n.mode
            self._record()
        return 0

    def unlink(self, path: str) -> int:
        with self._mutex:
            parent, name = self._parent(path)
            if name not in parent.entries:
                raise _fuse_error(errno.ENOENT)
            del parent.entries[name]
        return 0

    def rename(self, old: str, new: str) -> int:
        with self._mutex:
            src_parent, src_name = self._parent(old)
            dst_parent, dst_name = self._parent(new)
            n = src_parent.entries.get(src_name)
            if n is None:
                raise _fuse_error(errno.ENOENT)
            existing = dst_parent.entries.get(dst_name)
            if existing is not None and existing.kind == "dir" and existing.entries:
                raise _fuse_error(errno.ENOTEMPTY)
            del src_parent.entries[src_name]
            dst_parent.entries[dst_name] = n
        return 0

    def symlink(self, target: str, source: str) -> int:
        # mfusepy passes (link path, what it points to)
        with self._mutex:
            parent, name = self._parent(target)
            if name in parent.entries:
                raise _fuse_error(errno.EEXIST)
            parent.entries[name] = Node("link", stat.S_IFLNK | 0o777, target=source)
        return 0

    def readlink(self, path: str) -> str:
        with self._mutex:
            return self._lookup(path).target

    def chmod(self, path: str, mode: int) -> int:
        with self._mutex:
            n = self._lookup(path)
            n.mode = (n.mode & ~0o7777) | (mode & 0o7777)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        with self._mutex:
            self._lookup(path).mtime = (times[1] / 1e9) if times else time.time()
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": 1 << 20,
            "f_bfree": 1 << 19,
            "f_bavail": 1 << 19,
            "f_files": 1 << 20,
            "f_ffree": 1 << 19,
            "f_namemax": 255,
        }

    def access(self, path: str, amode: int) -> int:
        with self._mutex:
            self._lookup(path)
        return 0


class _Control(socketserver.StreamRequestHandler):
    fs: CrashFS

    def handle(self) -> None:
        for line in self.rfile:
            req = json.loads(line)
            try:
                out = self._do(req)
                self.wfile.write(json.dumps({"ok": True, **out}).encode() + b"\n")
            except Exception as exc:  # reported to the test, which fails with it
                self.wfile.write(json.dumps({"ok": False, "error": repr(exc)}).encode() + b"\n")

    def _do(self, req: dict[str, Any]) -> dict[str, Any]:
        fs = self.fs
        op = req["op"]
        if op == "load":
            fs.load(Path(req["src"]))
        elif op == "record":
            with fs._mutex:
                fs.recording = bool(req["on"])
                fs.states = [] if req["on"] else fs.states
        elif op == "count":
            return {"states": len(fs.states), "fsyncs": fs.fsyncs}
        elif op == "materialize":
            with fs._mutex:
                fs.materialize(int(req["index"]), Path(req["dest"]))
        elif op != "ping":
            raise ValueError(f"unknown op {op!r}")
        return {}


def serve(mountpoint: str, control: str) -> None:
    import mfusepy

    fs = CrashFS()
    handler = type("Handler", (_Control,), {"fs": fs})
    Path(control).unlink(missing_ok=True)
    server = socketserver.UnixStreamServer(control, handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mfusepy.FUSE(fs, mountpoint, foreground=True, nothreads=True, attr_timeout=0, entry_timeout=0)


class CrashFSClient:
    """Start CrashFS on `mountpoint` in its own process and drive it."""

    def __init__(self, mountpoint: Path, workdir: Path) -> None:
        self.mountpoint = mountpoint
        self.control = str(workdir / "crashfs.sock")
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.crashfs", str(mountpoint), self.control],
            cwd=Path(__file__).resolve().parent.parent,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while not os.path.ismount(mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.close()
                raise RuntimeError(f"CrashFS did not mount: {err.strip()}")
            time.sleep(0.05)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.control)
        self.reader = self.sock.makefile("rb")

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        reply = json.loads(self.reader.readline())
        if not reply.pop("ok"):
            raise RuntimeError(f"CrashFS {op}: {reply['error']}")
        return dict(reply)

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> CrashFSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
