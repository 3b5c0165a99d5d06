"""The campaign planner: campaign state + clock + counts in, actions out. No I/O.

One tick decides which devices to notify now (respecting the wave, the
concurrency cap, the rate, blackout windows and server-side preconditions),
which failed devices to retry (per failure type, after an exponential
backoff), whether the error gate stops the campaign, whether the end time has
come, and whether the current wave's success gate and soak allow the next
wave. The scheduler loop applies the decision and records it.

A failure that will still be retried is not counted by the gates yet; a
device deferred by a server-side precondition is neither counted nor allowed
to hold a wave back once every other device in it has finished.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from fleet_server.campaigns.spec import CampaignSpec
from shared.gates import Gate, MetricsSnapshot, Sample, Verdict, evaluate_gate
from shared.iotjobs import PENDING, JobStatus

FAILURES = frozenset({JobStatus.FAILED.value, JobStatus.TIMED_OUT.value, JobStatus.REJECTED.value})
# The rate is paced: one tick queues at most PACE_MAX_S seconds' worth of it (at least one
# second's, and never fewer than PACE_FLOOR devices), so a wave that opens at 60,000 a minute
# notifies 2,000 devices and then 1,000 a second, not 20,000 in one instant whose requests
# then wait at the broker past their timeouts. Small rates keep their whole minute at once.
PACE_MAX_S = 2.0
PACE_FLOOR = 100


@dataclass(frozen=True)
class MemberState:
    thing: str
    status: str | None  # None: not queued yet
    queued_at: datetime | None = None
    finished_at: datetime | None = None
    attempt: int = 1  # the execution number
    unmet: str | None = None  # why a server-side precondition defers it now


@dataclass(frozen=True)
class CampaignState:
    """The campaign device by device: how the planner's tests describe a fleet, and the
    reference `count_members` reduces to the `Counts` a tick is decided on."""

    wave: int  # index of the current wave
    wave_started_at: datetime
    members: tuple[MemberState, ...]  # in wave order (see `order_members`)
    advance_requested: bool = False  # an operator's "start next wave now"


@dataclass(frozen=True)
class Counts:
    """What a tick decides on: the campaign's executions counted, not listed. The scheduler
    has the database count them (`fleet_server.campaigns.service.counts`), so a tick costs
    the devices that can move now (retries due, devices to notify), not every member; the
    lists here are only those. `count_members` is the same reduction over a member list."""

    wave: int
    wave_started_at: datetime
    population: int  # members, for the wave bounds
    settled: Mapping[str, int]  # reached executions not awaiting a retry: status -> count
    last_done: datetime | None  # the latest finish among the settled terminal ones
    in_flight: int  # QUEUED or IN_PROGRESS, every wave
    succeeded: int  # every wave (the rate ramp's input)
    notified: int  # executions of any status, every wave
    queued_last_minute: int  # queued (or requeued) within the minute before `now`
    last_queued_at: datetime | None  # the latest queueing (or requeueing) of any execution
    retrying: tuple[MemberState, ...]  # failed, a retry still allowed (every wave)
    deferred: tuple[MemberState, ...]  # reached, not notified, held by a server-side precondition
    ready: tuple[str, ...]  # reached, not notified, free to go, in wave order
    advance_requested: bool = False


def count_members(spec: CampaignSpec, state: CampaignState, now: datetime) -> Counts:
    bounds = wave_bounds(spec, len(state.members))
    reached = state.members[: bounds[min(state.wave, len(bounds) - 1)]] if bounds else ()
    settled = [m for m in reached if m.status is not None and not retry_pending(spec, m)]
    executed = [m for m in state.members if m.status is not None]
    return Counts(
        wave=state.wave,
        wave_started_at=state.wave_started_at,
        population=len(state.members),
        settled=dict(Counter(str(m.status) for m in settled)),
        last_done=max((m.finished_at for m in settled if m.finished_at is not None), default=None),
        in_flight=sum(1 for m in executed if m.status in PENDING),
        succeeded=sum(1 for m in executed if m.status == JobStatus.SUCCEEDED.value),
        notified=len(executed),
        queued_last_minute=sum(
            1 for m in executed if m.queued_at is not None and now - m.queued_at < timedelta(minutes=1)
        ),
        last_queued_at=max((m.queued_at for m in executed if m.queued_at is not None), default=None),
        retrying=tuple(m for m in executed if retry_pending(spec, m)),
        deferred=tuple(m for m in reached if m.status is None and m.unmet is not None),
        ready=tuple(m.thing for m in reached if m.status is None and m.unmet is None),
        advance_requested=state.advance_requested,
    )


@dataclass
class Decision:
    queue: list[str] = field(default_factory=list)
    retry: list[str] = field(default_factory=list)
    end: str | None = None  # the schedule's end behaviour, once its end time has come
    advance_to: int | None = None
    pause_reason: str | None = None
    complete: bool = False
    held: str | None = None  # why no device was notified although the budget allowed some
    log: list[str] = field(default_factory=list)


def order_members(things: list[str], seed: int) -> list[str]:
    """Seeded shuffle, so a wave is a random slice of the fleet rather than one region or uplink,
    and the same seed gives the same order (recorded with the campaign)."""
    ordered = sorted(things)
    random.Random(seed).shuffle(ordered)
    return ordered


def wave_bounds(spec: CampaignSpec, population: int) -> list[int]:
    """Cumulative member counts at the end of each wave."""
    out: list[int] = []
    for w in spec.waves:
        n = math.ceil(population * w.percent / 100 - 1e-9) if w.percent is not None else w.count or 0
        n = min(population, max(n, 1 if population else 0))
        out.append(max(n, out[-1]) if out else n)
    return out


def metrics(counts: Counts, now: datetime) -> MetricsSnapshot:
    """The wave gates' input: one weighted sample per outcome over the settled terminal
    executions (the gates take the mean: a rate over as many samples as devices)."""
    terminal = {st: n for st, n in counts.settled.items() if JobStatus(st).terminal and n > 0}
    total = sum(terminal.values())
    at = min(counts.last_done or now, now)

    def rate(hits: int) -> list[Sample]:
        return [Sample(at, v, w) for v, w in ((1.0, hits), (0.0, total - hits)) if w > 0]

    return {
        "success_rate": rate(terminal.get(JobStatus.SUCCEEDED.value, 0)),
        "failure_rate": rate(sum(n for st, n in terminal.items() if st in FAILURES)),
    }


def retry_pending(spec: CampaignSpec, m: MemberState) -> bool:
    return m.status is not None and m.attempt <= spec.retry.allowed(m.status)


TRANSIENT_DEFERRAL = "blackout window"  # the reason's prefix for a device-local blackout


def plan_start(spec: CampaignSpec, now: datetime) -> bool:
    """Whether an approved campaign may start now."""
    return spec.schedule.start_at is None or now >= spec.schedule.start_at


# The cohort's beacons for the relative wave gates: (updated devices, devices not yet updated).
CohortSnapshots = tuple[MetricsSnapshot, MetricsSnapshot]


def plan_tick(
    spec: CampaignSpec,
    state: CampaignState | Counts,
    now: datetime,
    cohort: Callable[[], CohortSnapshots] | None = None,
    busy: str | None = None,
) -> Decision:
    """`cohort` is called only when a wave waits on its relative gates (`spec.compare`):
    loading the cohort's beacons costs a pass over it, which most ticks need not make.

    `busy` says the jobs service is saturated (why): no device is notified or retried this
    tick. Devices notified faster than the service answers wait past their request timeout
    and ask again, which is more work for the same service: a fleet notified at its
    campaign's rate instead of the service's pace turns a slow server into a retry storm."""
    c = count_members(spec, state, now) if isinstance(state, CampaignState) else state
    d = Decision()
    bounds = wave_bounds(spec, c.population)
    if not c.population:
        d.log.append("no devices in the cohort yet")
        return d
    wave = min(c.wave, len(bounds) - 1)
    reached = bounds[wave]
    snap = metrics(c, now)
    executed = sum(n for st, n in c.settled.items() if JobStatus(st).terminal)
    deferred = c.deferred

    error = evaluate_gate(spec.error_gate.gate("error", reached), snap, now)
    if error.verdict is Verdict.FAIL:
        d.pause_reason = f"error gate: {error.reason}"
        d.log.append(d.pause_reason)
        return d

    end_at = spec.schedule.end_at
    if end_at is not None and now >= end_at:
        d.end = spec.schedule.end_behavior
        d.log.append(f"end time {end_at.isoformat()} reached: {d.end.replace('_', ' ')}")
        return d

    in_flight = c.in_flight
    if deferred:
        deferred_by: dict[str, list[str]] = {}
        for m in deferred:
            deferred_by.setdefault(str(m.unmet), []).append(m.thing)

        def named(things: list[str]) -> str:  # which devices, so an operator can act on them
            shown = ", ".join(things[:3])
            return shown + (f" and {len(things) - 3} more" if len(things) > 3 else "")

        d.log.append(
            f"{len(deferred)} device(s) deferred by server-side preconditions: "
            + "; ".join(f"{reason} ({len(ts)}: {named(ts)})" for reason, ts in sorted(deferred_by.items()))
        )
    blackout = next((w for w in spec.blackouts if not w.per_device and w.window().is_open(now)), None)
    if blackout is not None:
        d.log.append(f"blackout window {blackout.cron!r} ({blackout.timezone}) open: nothing queued")
    else:
        per_minute = spec.rate.per_minute(c.succeeded, c.notified)
        since = (now - c.last_queued_at).total_seconds() if c.last_queued_at is not None else PACE_MAX_S
        paced = max(PACE_FLOOR, math.ceil(per_minute * min(max(since, 1.0), PACE_MAX_S) / 60))
        budget = min(spec.max_concurrent - in_flight, per_minute - c.queued_last_minute, paced)
        due = [
            m.thing
            for m in c.retrying
            if m.finished_at is not None and now - m.finished_at >= spec.retry.delay(m.attempt)
        ]
        if budget > 0 and busy is not None and (c.ready or due):
            d.held = f"jobs service busy ({busy}): no device notified this tick"
            d.log.append(d.held)
        elif budget > 0:
            d.retry = due[:budget]
            d.queue = list(c.ready[: budget - len(d.retry)])
        if d.retry:
            d.log.append(f"retrying {len(d.retry)} failed device(s) after backoff")
        if d.queue:
            d.log.append(
                f"wave {wave + 1}: notifying {len(d.queue)} device(s) "
                f"({in_flight} in flight, {per_minute}/min)"
            )

    # A device outside its blackout window now is waited for (the window passes by itself);
    # one that fails a standing precondition (offline, firmware, region) is not.
    waiting_out = [m for m in deferred if (m.unmet or "").startswith(TRANSIENT_DEFERRAL)]
    all_done = executed + len(deferred) == reached and not d.queue and not c.retrying and not waiting_out
    success = evaluate_gate(spec.success_gate.gate("success", reached), snap, now)
    if success.verdict is not Verdict.PASS:
        if all_done and not deferred:
            d.pause_reason = f"wave {wave + 1} finished below its success gate: {success.reason}"
            d.log.append(d.pause_reason)
        return d
    if wave == len(bounds) - 1:
        if all_done:
            d.complete = True
            skipped = f"; {len(deferred)} deferred device(s) not notified" if deferred else ""
            d.log.append(f"final wave passed ({success.reason}); campaign complete{skipped}")
        return d
    soak = timedelta(seconds=spec.waves[wave].soak_s)
    if not all_done:
        return d  # the wave's devices are still running
    last_done = c.last_done or c.wave_started_at
    if now - last_done < soak:  # soak: quiet time after the wave's last device finished
        d.log.append(f"wave {wave + 1} soaking, {(soak - (now - last_done)).total_seconds():.0f}s left")
        return d
    if spec.compare and not c.advance_requested:
        waited = now - last_done - soak
        held = _compare_cohort(spec, cohort() if cohort is not None else None, now)
        if held is not None:
            verdict, reason = held
            if verdict is Verdict.FAIL:
                d.pause_reason = (
                    f"wave {wave + 1}: updated devices worse than the rest of the cohort: {reason}"
                )
                d.log.append(d.pause_reason)
            elif waited >= timedelta(seconds=spec.compare_wait_s):
                d.pause_reason = (
                    f"wave {wave + 1}: the comparison with the rest of the cohort could not decide in "
                    f"{spec.compare_wait_s:g}s; waiting for a person (next-wave to go on): {reason}"
                )
                d.log.append(d.pause_reason)
            else:
                d.log.append(f"wave {wave + 1} passed; comparing with the rest of the cohort: {reason}")
            return d
        d.log.append(f"wave {wave + 1}: updated devices no worse than the rest of the cohort")
    if spec.waves[wave].manual_advance and not c.advance_requested:
        d.log.append(f"wave {wave + 1} passed; waiting for an operator to start wave {wave + 2}")
        return d
    d.advance_to = wave + 1
    d.log.append(f"wave {wave + 1} passed ({success.reason}); starting wave {wave + 2}")
    return d


def _compare_cohort(
    spec: CampaignSpec, snaps: CohortSnapshots | None, now: datetime
) -> tuple[Verdict, str] | None:
    """None when every comparison passes; else the verdict (FAIL, or WAIT: too few devices,
    inconclusive) and its reason."""
    gate = Gate((), name="cohort", comparisons=tuple(c.comparison() for c in spec.compare))
    result = evaluate_gate(gate, snaps[0] if snaps else {}, now, snaps[1] if snaps else None)
    if result.verdict is Verdict.PASS:
        return None
    return result.verdict, result.reason
