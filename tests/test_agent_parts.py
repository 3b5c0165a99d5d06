"""The daemon's parts on their own: preconditions, thermal levels, outbox, batcher, protocol helpers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from agent.batcher import DynamicBatcher, NoModelError, OnnxRunner, OverloadedError
from agent.outbox import Outbox
from agent.thermal import SysfsThermal, ThermalPolicy, next_level, throttle_for
from agent.vehicle import JsonFileVehicleState, VehicleState, evaluate_preconditions
from shared.iotjobs import Topics, check_status_details, clean_status_details
from shared.jobdoc import Preconditions
from tests.helpers import build_bundle

GOOD = VehicleState(battery_pct=80, ignition="off", parked=True, network="wifi", firmware="2.0.0")


@pytest.mark.parametrize(
    ("pre", "vehicle", "name", "reason"),
    [
        (
            Preconditions(min_battery_pct=30),
            GOOD.model_copy(update={"battery_pct": 10}),
            "battery",
            "10% < 30%",
        ),
        (Preconditions(min_battery_pct=30), VehicleState(), "battery", "unknown"),
        (
            Preconditions(require_parked=True),
            GOOD.model_copy(update={"parked": False}),
            "parked",
            "not parked",
        ),
        (
            Preconditions(require_ignition_off=True),
            GOOD.model_copy(update={"ignition": "on"}),
            "ignition",
            "on",
        ),
        (
            Preconditions(networks=["wifi"]),
            GOOD.model_copy(update={"network": "cellular"}),
            "network",
            "cellular not in wifi",
        ),
        (Preconditions(min_firmware="3.0.0"), GOOD, "firmware", "2.0.0 < 3.0.0"),
        (
            Preconditions(min_firmware="3.0.0"),
            GOOD.model_copy(update={"firmware": "garbage"}),
            "firmware",
            "garbage",
        ),
        (Preconditions(min_free_disk_mb=10_000), GOOD, "disk", "free disk 500 MB < 10000 MB"),
        (Preconditions(max_temperature_c=60), GOOD, "temperature", "65.0°C >= 60°C"),
    ],
)
def test_each_unmet_precondition_says_which_and_why(
    pre: Preconditions, vehicle: VehicleState, name: str, reason: str
) -> None:
    unmet = evaluate_preconditions(pre, vehicle, free_disk_mb=500, hottest_c=65.0, install_limit_c=None)
    assert [u.name for u in unmet] == [name]
    assert reason in unmet[0].reason
    everything_fine = evaluate_preconditions(
        pre,
        GOOD.model_copy(update={"firmware": "9.0.0"}),
        free_disk_mb=1e6,
        hottest_c=20.0,
        install_limit_c=None,
    )
    assert everything_fine == []


def test_vehicle_state_file_missing_corrupt_or_stale_is_unknown(tmp_path: Path) -> None:
    src = JsonFileVehicleState(tmp_path / "v.json")
    assert src.read() == VehicleState()
    (tmp_path / "v.json").write_text("{broken")
    assert src.read() == VehicleState()
    (tmp_path / "v.json").write_text('{"battery_pct": 50, "updated_at": "2020-01-01T00:00:00Z"}')
    assert src.read().battery_pct is None
    (tmp_path / "v.json").write_text('{"battery_pct": 50}')
    assert src.read().battery_pct == 50


def test_thermal_levels_rise_at_once_and_fall_with_hysteresis() -> None:
    p = ThermalPolicy(thresholds_c=(70, 80, 90), hysteresis_c=5, install_limit_c=80)
    level = 0
    trace = []
    for t in (60, 72, 85, 95, 88, 86, 84, 74, 66, 64, 40):
        level = next_level(level, t, p)
        trace.append(level)
    assert trace == [0, 1, 2, 3, 3, 3, 2, 1, 1, 0, 0]
    assert next_level(2, None, p) == 2  # no reading: hold
    th = throttle_for(2, 85, p, base_batch=32, base_concurrency=4)
    assert (th.max_batch, th.concurrency, th.installs_allowed) == (8, 1, False)
    assert throttle_for(0, None, p, base_batch=32, base_concurrency=4).installs_allowed


def test_sysfs_thermal_reads_zones(tmp_path: Path) -> None:
    for i, (kind, milli) in enumerate([("cpu", "45500"), ("gpu", "61000"), ("broken", "n/a")]):
        z = tmp_path / f"thermal_zone{i}"
        z.mkdir()
        (z / "type").write_text(kind)
        (z / "temp").write_text(milli)
    assert SysfsThermal(tmp_path).read() == {"thermal_zone0:cpu": 45.5, "thermal_zone1:gpu": 61.0}


def test_outbox_is_ordered_bounded_and_durable(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "q.sqlite", max_messages=5)
    for i in range(8):
        box.put("t", str(i).encode())
    assert len(box) == 5 and box.dropped == 3
    assert [m.payload for m in box.peek(10)] == [b"3", b"4", b"5", b"6", b"7"]
    box.ack(box.peek(1)[0].id)
    seq = box.next_seq()
    box.close()
    again = Outbox(tmp_path / "q.sqlite", max_messages=5)  # after a restart
    assert [m.payload for m in again.peek(10)] == [b"4", b"5", b"6", b"7"]
    assert again.dropped == 3 and again.next_seq() == seq + 1


def test_status_details_limits() -> None:
    assert check_status_details({"step": "writing"}) is None
    assert "key" in (check_status_details({"bad key!": "x"}) or "")
    assert "1024" in (check_status_details({"k": "x" * 1025}) or "")
    cleaned = clean_status_details({"bad key!": 5, "long": "y" * 2000, "": "dropped"})
    assert cleaned == {"bad_key_": "5", "long": "y" * 1024}
    assert check_status_details(cleaned) is None
    with pytest.raises(ValueError):
        Topics("bad/thing")
    assert Topics("car-1").update("j1") == "$aws/things/car-1/jobs/j1/update"


# ---- the batcher ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slot(tmp_path_factory: pytest.TempPathFactory, sample_payload: Path) -> Path:
    from shared.bundle import read_bundle

    tmp = tmp_path_factory.mktemp("slot")
    bundle = build_bundle(sample_payload, tmp / "b.bundle")
    dest = tmp / "slot"
    dest.mkdir()
    manifest = read_bundle(bundle, dest)
    (dest / "bundle.json").write_bytes(manifest.to_json_bytes())
    return dest


def test_batcher_batches_and_matches_direct_inference(slot: Path) -> None:
    runner = OnnxRunner(slot)
    samples = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)
    direct = runner.run_batch(samples)[0]

    async def go() -> list[dict[str, np.ndarray]]:
        b = DynamicBatcher(runner, max_batch=16, max_delay_ms=20, max_queue=128, concurrency=2)
        b.start()
        try:
            out = await asyncio.gather(*(b.infer(s) for s in samples))
            assert b.stats.batches < len(samples)  # requests were really combined
            assert b.stats.count == len(samples)
            return out
        finally:
            await b.stop()

    results = asyncio.run(go())
    got = np.stack([r["probabilities"] for r in results])
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)


def test_batcher_backpressure_and_no_model(slot: Path) -> None:
    async def go() -> None:
        b = DynamicBatcher(OnnxRunner(slot), max_batch=4, max_delay_ms=50, max_queue=3, concurrency=1)
        # not started: the queue fills and the next caller is refused at once
        waiting = [asyncio.ensure_future(b.infer(np.zeros(16, np.float32))) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError, match="queue is full"):
            await b.infer(np.zeros(16, np.float32))
        b.start()
        await asyncio.gather(*waiting)
        await b.stop()
        empty = DynamicBatcher(None)
        with pytest.raises(NoModelError):
            await empty.infer(np.zeros(16, np.float32))

    asyncio.run(go())


def test_batcher_reload_drops_no_request(slot: Path) -> None:
    async def go() -> None:
        b = DynamicBatcher(OnnxRunner(slot), max_batch=8, max_delay_ms=1, max_queue=4096, concurrency=2)
        b.start()
        sample = np.ones(16, np.float32)
        calls = [asyncio.ensure_future(b.infer(sample)) for _ in range(500)]
        for _ in range(5):
            await asyncio.sleep(0.005)
            b.reload(OnnxRunner(slot))  # a committed flip while requests stream in
        results = await asyncio.gather(*calls, return_exceptions=True)
        await b.stop()
        assert not [r for r in results if isinstance(r, BaseException)]
        assert b.stats.count == 500 and b.stats.errors == 0

    asyncio.run(go())


def test_the_self_test_measures_its_own_memory_not_its_parents(tmp_path: Path, sample_payload: Path) -> None:
    """Linux carries a parent's ru_maxrss across fork and exec: a child of a 600 MB parent
    would report 600 MB. The self-test's peak must be the child's own."""
    from agent.selftest import run_selftest
    from shared.bundle import read_bundle
    from tests.helpers import build_bundle

    slot = tmp_path / "slot"
    manifest = read_bundle(build_bundle(sample_payload, tmp_path / "b.bundle"), slot)
    (slot / "bundle.json").write_bytes(manifest.to_json_bytes())
    ballast = bytearray(600 * 1024 * 1024)  # this process now holds 600 MB
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    result = run_selftest(slot)
    del ballast
    assert result.passed, result.reason
    assert result.peak_rss_mb is not None and result.peak_rss_mb < 400


def test_the_quality_proxy_counts_detections_and_confidence_by_time_of_day() -> None:
    import numpy as np

    from agent.quality import QualityProxy, condition

    q = QualityProxy()
    scores = np.array([[0.9, 0.1], [0.3, 0.2], [0.1, 0.8]])  # two boxes present of three
    q.add({"boxes": np.zeros((3, 4)), "scores": scores}, hour=23)
    q.add({"boxes": np.zeros((3, 4)), "scores": scores[:1]}, hour=2)
    q.add({"probabilities": np.array([0.7, 0.3])}, hour=12)
    assert q.snapshot() == {"detections_per_frame@time=night": 1.5, "top_score_mean@time=day": 0.7}
    assert condition(6) == "time=day" and condition(18) == "time=night"
