"""System metrics for every Tidegate process's `/metrics`: the process (CPU seconds, resident
memory, open files: prometheus-client's own collector) and the machine (CPU utilisation since
the last scrape, memory, and the GPU where one can be read).

The machine's figures come from files, read at scrape time relative to `root`, so tests and
benches point it at a directory laid out like `/` and nothing is sampled in the background:

* `proc/stat` (CPU jiffies) and `proc/meminfo`;
* a Jetson's integrated GPU: `sys/devices/gpu.0/load` (per mille) — or, on a discrete NVIDIA
  GPU, NVML through `pynvml` when it is installed and a driver answers.

Metric names are the same in the gateway, the fleet server and the agent, so one Grafana
panel shows all three (the scrape job tells them apart).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


def read_cpu_jiffies(root: Path) -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from `proc/stat`, or None where it is not readable."""
    try:
        first = (root / "proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not first or first[0] != "cpu":
        return None
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def read_meminfo(root: Path) -> dict[str, int]:
    """`proc/meminfo` in bytes (MemTotal, MemAvailable, …); empty where it is not readable."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in (root / "proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


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
        self._last: tuple[int, int] = (0, 0)
        self._value: float | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        cpu = GaugeMetricFamily(
            "tidegate_system_cpu_utilisation", "Share of CPU time busy since the previous scrape (0-1)"
        )
        if (now := read_cpu_jiffies(self.root)) is not None:
            with self._lock:
                busy, total = now[0] - self._last[0], now[1] - self._last[1]
                if total > 0:  # scrapes within one clock tick repeat the last figure
                    self._last, self._value = now, busy / total
                if self._value is not None:
                    cpu.add_metric([], self._value)
        yield cpu
        mem = read_meminfo(self.root)
        total_mem = GaugeMetricFamily("tidegate_system_memory_total_bytes", "Physical memory")
        available = GaugeMetricFamily(
            "tidegate_system_memory_available_bytes", "Memory available without swapping"
        )
        if "MemTotal" in mem:
            total_mem.add_metric([], mem["MemTotal"])
        if "MemAvailable" in mem:
            available.add_metric([], mem["MemAvailable"])
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


def register_system_metrics(registry: CollectorRegistry, root: Path = Path("/")) -> None:
    """Process and machine metrics on `registry` (`tidegate_process_*`, `tidegate_system_*`,
    `tidegate_gpu_*`)."""
    kwargs: dict[str, Any] = {"namespace": "tidegate", "registry": registry}
    if root != Path("/"):
        kwargs["proc"] = str(root / "proc")
    ProcessCollector(**kwargs)
    registry.register(SystemCollector(root))
