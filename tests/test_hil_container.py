"""The container rig (`--target container://IMAGE`) on a real engine: podman's Docker API,
driven through the `docker` SDK, with real cgroup limits standing in for a target SoC."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.samples import make_memory_hungry_classifier
from hil.container import Bind, ContainerTarget
from hil.targets import TargetTimeoutError
from tests.container_engine import PODMAN, RUNC, host_mounts, host_tree_image, podman_engine, rig_containers
from tests.helpers import build_bundle, self_test
from tidegate.cli import main

pytestmark = pytest.mark.skipif(
    PODMAN is None or RUNC is None,
    reason="podman and runc (Debian packages) are needed; .ci/run installs them",
)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, sample_payload: Path) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("container-rig")
    with podman_engine(d) as url:
        image = host_tree_image(url)
        pyz = d / "tidegate-probe.pyz"
        assert main(["hil", "probe-package", "--out", str(pyz)]) == 0
        good = build_bundle(
            sample_payload,
            d / "good.bundle",
            name="classifier",
            version="1.0.0",
            skus=["edge-cpu"],
            self_test=self_test(memory_ceiling_mb=1024.0),
        )
        hungry_payload = shutil.copytree(sample_payload, d / "payload-hungry")
        make_memory_hungry_classifier(hungry_payload / "model.onnx", mb=1024)
        hungry = build_bundle(
            hungry_payload,
            d / "hungry.bundle",
            name="classifier",
            version="1.1.0",
            skus=["edge-cpu-x86"],
            self_test=self_test(memory_ceiling_mb=512.0),
        )
        yield {"url": url, "image": image, "pyz": pyz, "good": good, "hungry": hungry, "dir": d}


def _container_args(rig: dict[str, Any], *, cpus: str, memory: str) -> list[str]:
    mounts = [arg for m in host_mounts() for arg in ("--container-mount", m)]
    return [
        "--target",
        f"container://{rig['image']}",
        "--container-engine",
        rig["url"],
        "--container-cpus",
        cpus,
        "--container-memory",
        memory,
        *mounts,
        "--remote-python",
        sys.executable,
        "--probe",
        str(rig["pyz"]),
    ]


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_suites_run_in_a_container_under_its_limits_and_leave_no_container_behind(
    rig: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The probe runs inside the container and reads the cgroup's quota and limit (not the
    host's two cores and 24 GiB); the pre-flight judges the SKU against that limit."""
    out = tmp_path / "report"
    code, text = _cli(
        [
            "hil",
            "run",
            "--bundle",
            str(rig["good"]),
            "--suite",
            "smoke",
            "--runs",
            "30",
            "--out",
            str(out),
            *_container_args(rig, cpus="1", memory="1200m"),
        ],
        capsys,
    )
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == f"container://{rig['image']} (cpus=1, memory=1200m)"
    assert report["rig"]["cpu_limit"] == 1.0 and report["rig"]["memory_limit_mb"] == 1200.0
    memory = next(c for c in report["preflight"]["checks"] if c["name"] == "memory")
    assert memory["passed"] and "a limit of 1200 MB on its cgroup" in memory["detail"]
    assert "quota of 1 CPUs" in memory["detail"]
    assert [r["status"] for r in report["results"]] == ["passed"] * 4
    assert report["workdir"].startswith("/tmp/tidegate-hil-")
    assert rig_containers(rig["url"]) == []
    # The same SKU on a rig with half its memory ceiling: not fit, said before anything runs.
    code, text = _cli(
        [
            "hil",
            "doctor",
            "--sku",
            "edge-cpu",
            "--suite",
            "smoke",
            *_container_args(rig, cpus="0.5", memory="512m"),
        ],
        capsys,
    )
    assert code == 2, text
    assert "a limit of 512 MB on its cgroup" in text and "SKU edge-cpu's memory ceiling is 1024 MB" in text
    assert "could be killed here" in text
    code, text = _cli(
        [
            "hil",
            "doctor",
            "--sku",
            "edge-cpu",
            "--suite",
            "smoke",
            *_container_args(rig, cpus="1.5", memory="2g"),
        ],
        capsys,
    )
    assert code == 0 and "cgroup limits 1.5 CPUs and 2048 MB" in text, text
    assert rig_containers(rig["url"]) == []


def test_a_model_over_the_rigs_memory_is_killed_in_each_suite_alone_and_the_report_says_so(
    rig: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SoC without swap kills a model past its memory: so does the rig. Each suite's probe is
    OOM-killed on its own (the container stays for the next one) and the reason names the limit."""
    out = tmp_path / "report"
    code, text = _cli(
        [
            "hil",
            "run",
            "--bundle",
            str(rig["hungry"]),
            "--sku",
            "edge-cpu-x86",
            "--suite",
            "smoke",
            "--runs",
            "10",
            "--out",
            str(out),
            *_container_args(rig, cpus="1", memory="640m"),
        ],
        capsys,
    )
    assert code == 1, text
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["started"] and not report["passed"]
    for result in report["results"]:
        assert result["status"] == "error", result
        assert "exited 137" in result["reason"] and "OOM killer" in result["reason"], result
        assert "memory limit of 640 MiB" in result["reason"], result
    assert rig_containers(rig["url"]) == []


def test_a_command_past_its_time_is_killed_inside_the_container(rig: dict[str, Any]) -> None:
    """A timeout kills the process in the container (another exec), not only the stream."""

    async def go() -> tuple[str, str]:
        target = ContainerTarget(
            rig["image"],
            engine=rig["url"],
            mounts=[Bind.parse(m) for m in host_mounts()],
        )
        await target.connect()
        try:
            with pytest.raises(TargetTimeoutError, match="did not finish within 1 s and was killed"):
                await target.run(["sleep", "300"], timeout_s=1)
            listing = await target.run(["ps", "-eo", "args"], timeout_s=10)
            return listing.stdout, target.workdir
        finally:
            await target.close()

    listing, workdir = asyncio.run(go())
    assert "sleep infinity" in listing and "sleep 300" not in listing
    assert workdir.startswith("/tmp/tidegate-hil-")
    assert rig_containers(rig["url"]) == []


def test_bad_container_rigs_say_what_to_do(
    rig: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["hil", "run", "--bundle", str(rig["good"]), "--out", str(tmp_path / "r")]
    code, text = _cli(
        [
            *base,
            "--target",
            f"container://{rig['image']}",
            "--container-engine",
            f"unix://{tmp_path}/none.sock",
        ],
        capsys,
    )
    assert (
        code == 2 and "cannot reach a container engine at unix://" in text and "podman system service" in text
    )
    code, text = _cli(
        [*base, "--target", "container://localhost/no-such-rig:1", "--container-engine", rig["url"]], capsys
    )
    assert code == 2 and "no image 'localhost/no-such-rig:1'" in text and "does not pull" in text
    code, text = _cli(
        [*base, "--target", f"container://{rig['image']}", "--container-memory", "lots"], capsys
    )
    assert code == 2 and "--container-memory 'lots'" in text
    code, text = _cli(
        [*base, "--target", f"container://{rig['image']}", "--container-mount", "relative:/x"], capsys
    )
    assert code == 2 and "both paths must be absolute" in text
    code, text = _cli([*base, "--container-cpus", "2"], capsys)
    assert code == 2 and "--container-cpus is for a container:// target, not 'local'" in text
    assert rig_containers(rig["url"]) == []
