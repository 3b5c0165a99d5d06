"""Verdicts: a suite's figures against the bundle's budgets. Pure: figures and budgets in,
(passed, reason) out, so a rig measures and the bench decides with one policy everywhere."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Budgets:
    latency_p95_ms: float  # the bundle's self_test.latency_budget_ms
    memory_ceiling_mb: float  # the bundle's self_test.memory_ceiling_mb
    throttled_factor: float = 2.0  # the throttled p95 may be this many times the budget
    max_jitter_fraction: float = 0.5  # p99 − p50 while throttled, as a share of the p95 budget


Verdict = tuple[bool, str]


def contract(f: dict[str, Any], b: Budgets) -> Verdict:
    if f["mismatches"]:
        return False, "model and inference_config.json disagree: " + "; ".join(f["mismatches"])
    if not f["selftest"]["passed"]:
        return False, f"golden self-test failed: {f['selftest']['reason']}"
    answered = [label for label, why in f["bad_inputs_refused"].items() if why is None]
    if answered:
        return False, f"the runtime answered bad inputs instead of refusing them: {', '.join(answered)}"
    n = len(f["actual"]["inputs"]) + len(f["actual"]["outputs"])
    return True, (
        f"{n} tensors match inference_config.json; golden outputs within tolerance "
        f"(max abs error {f['selftest']['max_abs_error']:.3g}); "
        f"{len(f['bad_inputs_refused'])} bad inputs refused"
    )


def latency(f: dict[str, Any], b: Budgets) -> Verdict:
    p95 = f["p95_ms"]
    figures = f"p50 {f['p50_ms']:.2f} ms, p95 {p95:.2f} ms, p99 {f['p99_ms']:.2f} ms over {f['runs']} runs"
    if p95 > b.latency_p95_ms:
        return False, f"{figures}: p95 above the budget of {b.latency_p95_ms:g} ms"
    return True, f"{figures}; budget {b.latency_p95_ms:g} ms"


def memory(f: dict[str, Any], b: Budgets) -> Verdict:
    peak = f["peak_rss_mb"]
    if peak > b.memory_ceiling_mb:
        return False, f"peak RSS {peak:.0f} MB above the ceiling of {b.memory_ceiling_mb:g} MB"
    return True, f"peak RSS {peak:.0f} MB within the ceiling of {b.memory_ceiling_mb:g} MB"


def determinism(f: dict[str, Any], b: Budgets) -> Verdict:
    if f["differing_runs"]:
        return False, f"{f['differing_runs']} of {f['repeats']} repeated runs gave different outputs"
    jitter, bound = f["throttled_jitter_ms"], b.latency_p95_ms * b.max_jitter_fraction
    if jitter > bound:
        return False, (
            f"outputs identical over {f['repeats']} runs, but latency while throttled varies: "
            f"p99 − p50 = {jitter:.2f} ms (bound {bound:g} ms)"
        )
    return True, (
        f"outputs bit-identical over {f['repeats']} runs; throttled latency p99 − p50 = {jitter:.3f} ms "
        f"(bound {bound:g} ms)"
    )


def thermal(f: dict[str, Any], b: Budgets) -> Verdict:
    first = f["thresholds_c"][0]
    source = "simulated zone" if f.get("simulated") else "thermal zones"
    if f.get("max_temp_c") is None:
        return False, f"read no temperature in {f['soak_s']:g} s ({source}): nothing was measured"
    hot = [p for p in f["trace"] if p["temp_c"] is not None and p["temp_c"] >= first]
    if hot and not any(p["level"] > 0 for p in hot):
        return (
            False,
            f"the zone reached {f['max_temp_c']:.1f} °C (limit {first:g}) but throttling never engaged",
        )
    budget = b.latency_p95_ms * b.throttled_factor
    tp95 = f["throttled_p95_ms"]
    if tp95 is not None and tp95 > budget:
        return False, f"throttled p95 {tp95:.2f} ms above the throttled budget of {budget:g} ms"
    if not hot:
        return (
            True,
            f"{f['soak_s']:g} s soak ({source}) stayed below {first:g} °C (max {f['max_temp_c']:.1f}); "
            "no throttling needed",
        )
    return True, (
        f"{f['soak_s']:g} s soak ({source}): max {f['max_temp_c']:.1f} °C, throttling engaged (max level "
        f"{f['max_level']}), throttled p95 {tp95:.2f} ms within {budget:g} ms"
    )


def install(f: dict[str, Any], b: Budgets) -> Verdict:
    wrong = [s for s in f["steps"] if not s["as_expected"]]
    if wrong:
        s = wrong[0]
        return False, (
            f"{s['step']}: {s['outcome']} ({s['reason']}); active {s['active_version']}, "
            f"expected {s['expected_version']}"
        )
    names = " → ".join(s["step"] for s in f["steps"])
    if f["previous_version"] is None:
        return True, f"{names}: committed (no earlier version in the repository to roll back to)"
    return True, f"{names}: every state as expected"


JUDGES = {
    "contract": contract,
    "latency": latency,
    "memory": memory,
    "determinism": determinism,
    "thermal": thermal,
    "install": install,
}
