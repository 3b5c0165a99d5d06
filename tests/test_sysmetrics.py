"""System metrics: the machine's figures from /proc-shaped files, and the process's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from shared.sysmetrics import register_system_metrics


def _stat(root: Path, busy: int, idle: int) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
    (root / "proc/stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 7 0\ncpu0 1 0 0 1 0 0 0 0 0 0\n")


def test_machine_figures_come_from_the_files_and_cpu_is_over_the_scrape_interval(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "sys/devices/gpu.0").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text(
        "MemTotal:        8000000 kB\nMemFree: 100 kB\nMemAvailable:    2000000 kB\n"
    )
    (tmp_path / "sys/devices/gpu.0/load").write_text("375\n")
    _stat(tmp_path, busy=100, idle=300)
    reg = CollectorRegistry()
    register_system_metrics(reg, tmp_path)
    assert reg.get_sample_value("tidegate_system_cpu_utilisation") == pytest.approx(0.25)  # since boot
    _stat(tmp_path, busy=190, idle=310)  # +90 busy, +10 idle since that scrape
    assert reg.get_sample_value("tidegate_system_cpu_utilisation") == pytest.approx(0.9)
    assert reg.get_sample_value("tidegate_system_memory_total_bytes") == 8000000 * 1024
    assert reg.get_sample_value("tidegate_system_memory_available_bytes") == 2000000 * 1024
    assert reg.get_sample_value("tidegate_gpu_utilisation", {"gpu": "gpu.0"}) == 0.375
    (tmp_path / "sys/devices/gpu.0/load").unlink()  # no GPU: no series, no error
    (tmp_path / "proc/stat").write_text("garbage\n")
    assert reg.get_sample_value("tidegate_gpu_utilisation", {"gpu": "gpu.0"}) is None
    assert reg.get_sample_value("tidegate_system_cpu_utilisation") is None  # unreadable: absent


def test_this_machine_and_process_are_measured() -> None:
    reg = CollectorRegistry()
    register_system_metrics(reg)
    rss = reg.get_sample_value("tidegate_process_resident_memory_bytes")
    assert rss is not None and rss > 10 * 2**20  # a Python process with numpy loaded
    total = reg.get_sample_value("tidegate_system_memory_total_bytes")
    available = reg.get_sample_value("tidegate_system_memory_available_bytes")
    assert total is not None and available is not None and 0 < available <= total
    cpu = reg.get_sample_value("tidegate_system_cpu_utilisation")
    assert cpu is not None and 0 <= cpu <= 1
    assert (reg.get_sample_value("tidegate_process_cpu_seconds_total") or 0) > 0
    assert (reg.get_sample_value("tidegate_process_open_fds") or 0) >= 3  # stdin, stdout, stderr
    assert (reg.get_sample_value("tidegate_process_threads") or 0) >= 1
