"""System metrics for every Tidegate process's `/metrics`: the process (CPU seconds, resident
and virtual memory, open files, threads) and the machine (CPU utilisation since the last
scrape, memory, and the GPU where one can be read).

The process and the machine are read through psutil at scrape time; nothing is sampled in the
background. For the machine, `root` may name a directory laid out like `/` (tests and benches
fake a device that way): psutil then reads that tree's `proc/stat` and `proc/meminfo`. The GPU:

* a Jetson's integrated GPU: `sys/devices/gpu.0/load` (per mille, sysfs; psutil has no GPU) —
  or, on a discrete NVIDIA GPU, NVML through `pynvml` when it is installed and a driver answers.

Metric names are the same in the gateway, the fleet server and the agent, so one Grafana
panel shows all three (the scrape job tells them apart).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_PROCFS = threading.Lock()


@contextlib.contextmanager
def _machine(root: Path) -> Iterator[None]:
    """psutil reading `root`'s proc tree for the duration (psutil's documented PROCFS_PATH;
    it is global, so it is switched under a lock and only for a root other than `/`)."""
    if root == Path("/"):
        yield
        return
    with _PROCFS:
        saved, psutil.PROCFS_PATH = psutil.PROCFS_PATH, str(root / "proc")
        try:
            with warnings.catch_warnings():  # a sparse fake meminfo: psutil warns, figures stand
                warnings.simplefilter("ignore", RuntimeWarning)
                yield
        finally:
            psutil.PROCFS_PATH = saved


def read_cpu_times(root: Path) -> tuple[float, float] | None:
    """(busy, total) CPU seconds of all CPUs since boot, or None where they cannot be read.
    Guest time is already inside user and nice on Linux, so it is not counted twice."""
    try:
        with _machine(root):
            t = psutil.cpu_times()
    except (OSError, ValueError, IndexError, TypeError, psutil.Error):  # absent, or not a stat file
        return None
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return total - t.idle - getattr(t, "iowait", 0.0), total


def read_memory(root: Path) -> tuple[int, int] | None:
    """(total, available) bytes of physical memory, or None where they cannot be read."""
    try:
        with _machine(root):
            vm = psutil.virtual_memory()
    except (OSError, ValueError, KeyError, psutil.Error):
        return None
    return int(vm.total), int(vm.available)


def read_gpus(root: Path) -> list[tuple[str, float, int | None]]:
    """(gpu, utilisation 0–1, memory used in bytes or None) for each readable GPU."""
    gpus: list[tuple[str, float, int | None]] = []
    with contextlib.suppress(OSError, ValueError):
        load = int((root / "sys/devices/gpu.0/load").read_text().strip())
        gpus.append(("gpu.0", load / 1000.0, None))
    if gpus or root != Path("/"):
        return gpus
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return gpus
    with contextlib.suppress(Exception):  # no driver, no device: no GPU metrics, not an error
        pynvml.nvmlInit()
        try:
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                util = pynvml.nvmlDeviceGetUtilizationRates(handle)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                gpus.append((str(i), util.gpu / 100.0, int(mem.used)))
        finally:
            pynvml.nvmlShutdown()
    return gpus


class SystemCollector(Collector):
    """The machine's CPU, memory and GPU at scrape time. CPU utilisation is over the interval
    since the previous scrape (the first scrape reports the average since boot)."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        self._last: tuple[float, float] = (0.0, 0.0)
        self._value: float | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        cpu = GaugeMetricFamily(
            "tidegate_system_cpu_utilisation", "Share of CPU time busy since the previous scrape (0-1)"
        )
        if (now := read_cpu_times(self.root)) is not None:
            with self._lock:
                busy, total = now[0] - self._last[0], now[1] - self._last[1]
                if total > 0:  # scrapes within one clock tick repeat the last figure
                    self._last, self._value = now, min(max(busy / total, 0.0), 1.0)
                if self._value is not None:
                    cpu.add_metric([], self._value)
        yield cpu
        total_mem = GaugeMetricFamily("tidegate_system_memory_total_bytes", "Physical memory")
        available = GaugeMetricFamily(
            "tidegate_system_memory_available_bytes", "Memory available without swapping"
        )
        if (mem := read_memory(self.root)) is not None:
            total_mem.add_metric([], mem[0])
            available.add_metric([], mem[1])
        yield total_mem
        yield available
        util = GaugeMetricFamily("tidegate_gpu_utilisation", "GPU busy share (0-1)", labels=["gpu"])
        used = GaugeMetricFamily("tidegate_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        for gpu, u, m in read_gpus(self.root):
            util.add_metric([gpu], u)
            if m is not None:
                used.add_metric([gpu], m)
        yield util
        yield used


class ProcessMetrics(Collector):
    """This process, through psutil (the names prometheus-client's own process collector uses,
    under the `tidegate` namespace, so dashboards read either)."""

    def __init__(self) -> None:
        self.process = psutil.Process(os.getpid())

    def collect(self) -> Iterator[Metric]:
        p = self.process
        with p.oneshot():
            cpu, mem = p.cpu_times(), p.memory_info()
            fds, threads, started = p.num_fds(), p.num_threads(), p.create_time()
        seconds = CounterMetricFamily("tidegate_process_cpu_seconds", "User and system CPU time spent")
        seconds.add_metric([], cpu.user + cpu.system)
        yield seconds
        for name, text, value in (
            ("resident_memory_bytes", "Resident memory", mem.rss),
            ("virtual_memory_bytes", "Virtual memory", mem.vms),
            ("open_fds", "Open file descriptors", fds),
            ("threads", "Threads", threads),
            ("start_time_seconds", "Start time since the Unix epoch", started),
        ):
            gauge = GaugeMetricFamily(f"tidegate_process_{name}", text)
            gauge.add_metric([], value)
            yield gauge
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            soft = p.rlimit(psutil.RLIMIT_NOFILE)[0]
            limit = GaugeMetricFamily("tidegate_process_max_fds", "Open file descriptor limit")
            limit.add_metric([], soft)
            yield limit


def register_system_metrics(registry: CollectorRegistry, root: Path = Path("/")) -> None:
    """Process and machine metrics on `registry` (`tidegate_process_*`, `tidegate_system_*`,
    `tidegate_gpu_*`). `root` fakes the machine, never the process: the process is this one."""
    registry.register(ProcessMetrics())
    registry.register(SystemCollector(root))
