"""Experiment statistics, pure: plan the sample size, test sequentially, check the split,
and run a Thompson-sampling bandit.

* `sample_size`: per-arm n for a two-sided test of two proportions at a minimum detectable
  effect, alpha and power (the normal approximation every calculator uses).
* `MSPRT`: the mixture sequential probability ratio test (Johari et al., "Always valid
  inference", 2017) on the difference of two arms' means. Its p-value stays valid however
  often it is looked at, so a dashboard may peek after every batch; the naive fixed-horizon
  test peeked the same way does not (the tests show both).
* `srm_p_value`: chi-square goodness of fit of arm counts against the planned split
  (sample-ratio mismatch; flag below 0.001).
* `Thompson`: Beta-Bernoulli Thompson sampling with a fixed-split burn-in, and its regret.
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import asdict, dataclass, field, replace
from statistics import NormalDist
from typing import Any

from cloud_serving.routing import Split

_N = NormalDist()


def sample_size(baseline: float, mde: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """Samples per arm to detect an absolute lift of `mde` over a `baseline` rate."""
    if not 0 < baseline < 1 or not 0 < baseline + mde < 1 or mde == 0:
        raise ValueError("baseline and baseline + mde must be rates in (0, 1), mde non-zero")
    p1, p2 = baseline, baseline + mde
    pbar = (p1 + p2) / 2
    za, zb = _N.inv_cdf(1 - alpha / 2), _N.inv_cdf(power)
    n = (za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2 / mde**2
    return math.ceil(n)


@dataclass
class MSPRT:
    """Always-valid test of H0: mean(treatment) - mean(control) = theta0, fed with running
    totals. `tau2` is the mixing variance over the effect (set it near the squared effect
    you expect); the variance is estimated from the data (Bernoulli or any bounded metric)."""

    alpha: float = 0.05
    tau2: float = 1e-4
    theta0: float = 0.0
    p_value: float = 1.0
    history: list[float] = field(default_factory=list)

    @staticmethod
    def _stats(n: int, sum_t: float, sumsq_t: float, sum_c: float, sumsq_c: float) -> tuple[float, float]:
        mt, mc = sum_t / n, sum_c / n
        var = max(sumsq_t / n - mt * mt, 0.0) + max(sumsq_c / n - mc * mc, 0.0)
        return mt - mc, max(var, 1e-12)

    def update(self, n: int, sum_t: float, sumsq_t: float, sum_c: float, sumsq_c: float) -> float:
        """`n` observations per arm so far (paired by arrival), their sums and sums of
        squares; returns the always-valid p-value (non-increasing)."""
        if n < 2:
            return self.p_value
        diff, var = self._stats(n, sum_t, sumsq_t, sum_c, sumsq_c)
        log_lambda = 0.5 * math.log(var / (var + n * self.tau2)) + (
            n * n * self.tau2 * (diff - self.theta0) ** 2
        ) / (2 * var * (var + n * self.tau2))
        self.p_value = min(self.p_value, math.exp(-log_lambda) if log_lambda < 700 else 0.0)
        self.history.append(self.p_value)
        return self.p_value

    def confidence_interval(
        self, n: int, sum_t: float, sumsq_t: float, sum_c: float, sumsq_c: float
    ) -> tuple[float, float]:
        """The always-valid (1 - alpha) interval for the difference: every theta0 the test
        would not reject now."""
        diff, var = self._stats(n, sum_t, sumsq_t, sum_c, sumsq_c)
        bound = 2 * var * (var + n * self.tau2) / (n * n * self.tau2)
        half = math.sqrt(
            max(0.0, bound * (math.log(1 / self.alpha) + 0.5 * math.log((var + n * self.tau2) / var)))
        )
        return diff - half, diff + half

    @property
    def rejected(self) -> bool:
        return self.p_value <= self.alpha


def naive_z_p_value(n: int, sum_t: float, sumsq_t: float, sum_c: float, sumsq_c: float) -> float:
    """The fixed-horizon two-sided z-test, for comparison: valid only if looked at once."""
    diff, var = MSPRT._stats(n, sum_t, sumsq_t, sum_c, sumsq_c)
    z = diff / math.sqrt(var / n)
    return 2 * (1 - _N.cdf(abs(z)))


def srm_p_value(counts: dict[str, int], planned: dict[str, float]) -> float:
    """Chi-square goodness of fit of observed arm counts against the planned shares (scipy;
    loaded the first time an experiment has enough traffic to be checked)."""
    from scipy.stats import chisquare

    total = sum(counts.values())
    weight = sum(planned.values())
    if total == 0:
        return 1.0
    observed = [counts.get(arm, 0) for arm in planned]
    expected = [total * share / weight for share in planned.values()]
    scale = sum(observed) / sum(expected)  # arms outside the plan do not count against it
    return float(chisquare(observed, [e * scale for e in expected]).pvalue)


@dataclass
class Thompson:
    """Beta-Bernoulli Thompson sampling over `arms`, after `burn_in` rounds of a fixed
    round-robin split (so no arm is written off on its first few draws)."""

    arms: list[str]
    burn_in: int = 100
    seed: int | None = None
    successes: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    pulls: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        for a in self.arms:
            self.successes.setdefault(a, 0)
            self.failures.setdefault(a, 0)

    def choose(self) -> str:
        self.pulls += 1
        if self.pulls <= self.burn_in:
            return self.arms[(self.pulls - 1) % len(self.arms)]
        draws = {a: self._rng.betavariate(1 + self.successes[a], 1 + self.failures[a]) for a in self.arms}
        return max(draws, key=lambda a: draws[a])

    def update(self, arm: str, reward: bool) -> None:
        if reward:
            self.successes[arm] += 1
        else:
            self.failures[arm] += 1

    def adopt(self, arms: dict[str, ArmStats]) -> None:
        """Take the posterior of every replica's rewards (a replicated bandit): the counts
        already include this replica's own, sent before they were read back."""
        for a in self.arms:
            stats = arms.get(a)
            if stats is not None:
                self.successes[a], self.failures[a] = stats.wins, stats.n - stats.wins

    def summary(self) -> dict[str, Any]:
        return {
            a: {
                "pulls": self.successes[a] + self.failures[a],
                "mean": (self.successes[a] + 1) / (self.successes[a] + self.failures[a] + 2),
            }
            for a in self.arms
        }


def regret(pulls: dict[str, int], true_rates: dict[str, float]) -> float:
    """Expected reward lost against always serving the best arm."""
    best = max(true_rates.values())
    return sum(n * (best - true_rates[a]) for a, n in pulls.items())


# ---- an experiment as the gateway runs it -------------------------------------------------------


@dataclass(frozen=True)
class ExperimentSpec:
    """An A/B test (or a bandit) between two loaded versions on a 0-1 reward the caller
    reports back (`/feedback`): plan, guardrail and what to do with the result."""

    control: str  # arm names; by default each arm is the model version of that name
    treatment: str
    treatment_share: float = 0.5
    baseline_rate: float = 0.1
    mde: float = 0.02  # the smallest absolute lift worth detecting
    alpha: float = 0.05
    power: float = 0.8
    mode: str = "ab"  # "ab": fixed sticky split, sequential test; "bandit": Thompson sampling
    burn_in: int = 200
    max_error_rate: float = 0.02  # guardrail on the treatment arm
    srm_threshold: float = 0.001
    cohort: dict[str, tuple[str, ...]] | None = None  # request metadata that must match, e.g. region
    hours_utc: tuple[int, int] | None = None  # [start, end) hour of day; None: always
    # Arms by post-processing config: an arm may name its version and its label threshold, so
    # two arms can be one model version with two thresholds.
    control_version: str | None = None
    treatment_version: str | None = None
    control_threshold: float | None = None
    treatment_threshold: float | None = None
    # ... or a weighted average of several versions' outputs (an ensemble), weights > 0.
    control_ensemble: dict[str, float] | None = None
    treatment_ensemble: dict[str, float] | None = None
    # Feature flags set while the experiment runs (in the flag store: the fleet server's or the
    # local registry file); kept if the treatment wins, reverted on any other end.
    flags: dict[str, Any] | None = None

    def ensemble_of(self, arm: str) -> dict[str, float] | None:
        """The arm's ensemble, weights normalised to sum to 1 (None: a single version)."""
        weights = self.control_ensemble if arm == self.control else self.treatment_ensemble
        if not weights:
            return None
        total = sum(weights.values())
        return {v: w / total for v, w in sorted(weights.items())}

    def version_of(self, arm: str) -> str:
        if ensemble := self.ensemble_of(arm):  # the heaviest member stands for it
            return max(ensemble, key=lambda v: (ensemble[v], v))
        if arm == self.control:
            return self.control_version or self.control
        return self.treatment_version or self.treatment

    def threshold_of(self, arm: str) -> float | None:
        return self.control_threshold if arm == self.control else self.treatment_threshold

    def admits(self, metadata: dict[str, Any], hour: int) -> bool:
        """Whether a request is in the experiment's population (else it is served as usual
        and not counted)."""
        if self.hours_utc is not None:
            start, end = self.hours_utc
            inside = start <= hour < end if start <= end else hour >= start or hour < end
            if not inside:
                return False
        return all(str(metadata.get(k)) in allowed for k, allowed in (self.cohort or {}).items())

    @property
    def planned_n(self) -> int:
        return sample_size(self.baseline_rate, self.mde, alpha=self.alpha, power=self.power)


ARM_FIELDS = ("assigned", "errors", "n", "total", "sumsq", "wins")


def spec_to_dict(spec: ExperimentSpec) -> dict[str, Any]:
    """A spec as JSON-able data (the replicas' shared store); `spec_from_dict` reverses it."""
    return {
        **asdict(spec),
        "cohort": {k: list(v) for k, v in spec.cohort.items()} if spec.cohort else None,
        "hours_utc": list(spec.hours_utc) if spec.hours_utc else None,
    }


def spec_from_dict(data: dict[str, Any]) -> ExperimentSpec:
    return ExperimentSpec(
        **{
            **data,
            "cohort": {k: tuple(v) for k, v in data["cohort"].items()} if data["cohort"] else None,
            "hours_utc": tuple(data["hours_utc"]) if data["hours_utc"] else None,
        }
    )


@dataclass
class ArmStats:
    assigned: int = 0
    errors: int = 0
    n: int = 0  # rewards reported
    total: float = 0.0
    sumsq: float = 0.0
    wins: int = 0  # rewards of 0.5 or more: a bandit's successes

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None


@dataclass
class Experiment:
    spec: ExperimentSpec
    started_at: str
    arms: dict[str, ArmStats] = field(default_factory=dict)
    test: MSPRT = field(default_factory=MSPRT)
    bandit: Thompson | None = None
    decision: str | None = None

    # Names this experiment among gateway replicas; `sent`: the counts already sent to them.
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    sent: dict[str, ArmStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.spec
        self.arms = {s.control: ArmStats(), s.treatment: ArmStats()}
        self.sent = {s.control: ArmStats(), s.treatment: ArmStats()}
        self.test = MSPRT(alpha=s.alpha, tau2=max(s.mde**2, 1e-8))
        # the sticky split, prepared once (the gateway picks an arm per request)
        self.split = Split.of({s.control: 1 - s.treatment_share, s.treatment: s.treatment_share}, [s.control])
        if s.mode == "bandit":
            self.bandit = Thompson([s.control, s.treatment], burn_in=s.burn_in)

    def drain(self) -> dict[str, dict[str, float]]:
        """Each arm's counts since the last drain (a replica sends them to the shared store,
        where the deciding replica adds every replica's)."""
        out = {}
        for arm, a in self.arms.items():
            was = self.sent[arm]
            delta = {f: getattr(a, f) - getattr(was, f) for f in ARM_FIELDS}
            if any(delta.values()):
                out[arm] = delta
                self.sent[arm] = replace(a)
        return out

    def record_error(self, arm: str) -> None:
        self.arms[arm].errors += 1

    def feedback(self, arm: str, reward: float) -> None:
        a = self.arms[arm]
        a.n, a.total, a.sumsq = a.n + 1, a.total + reward, a.sumsq + reward * reward
        a.wins += reward >= 0.5
        if self.bandit is not None:
            self.bandit.update(arm, reward >= 0.5)

    def _paired(self) -> tuple[int, float, float, float, float]:
        t, c = self.arms[self.spec.treatment], self.arms[self.spec.control]
        n = min(t.n, c.n)
        if n == 0:
            return 0, 0.0, 0.0, 0.0, 0.0
        return n, t.total * n / t.n, t.sumsq * n / t.n, c.total * n / c.n, c.sumsq * n / c.n

    def analyse(self) -> str | None:
        """A decision once one is due: treatment_wins, control_wins, inconclusive, or a stop
        (sample-ratio mismatch, guardrail). None: keep going."""
        s = self.spec
        t = self.arms[s.treatment]
        if t.assigned >= 100 and t.errors / t.assigned > s.max_error_rate:
            return (
                f"stopped: guardrail (treatment error rate {t.errors / t.assigned:.3f} > {s.max_error_rate})"
            )
        if self.bandit is None:
            counts = {arm: a.assigned for arm, a in self.arms.items()}
            planned = {s.control: 1 - s.treatment_share, s.treatment: s.treatment_share}
            if sum(counts.values()) >= 1000 and (p := srm_p_value(counts, planned)) < s.srm_threshold:
                return f"stopped: sample ratio mismatch (p = {p:.2g}, counts {counts})"
        n, *sums = self._paired()
        if n < 2:
            return None
        self.test.update(n, *sums)
        if self.test.rejected:
            diff = sums[0] / n - sums[2] / n
            return "treatment_wins" if diff > 0 else "control_wins"
        if n >= 3 * s.planned_n:
            return "inconclusive"
        return None

    def summary(self) -> dict[str, Any]:
        """`ab_summary.json`: effect, always-valid interval, power achieved, decision."""
        s = self.spec
        n, *sums = self._paired()
        effect = (sums[0] - sums[2]) / n if n else None
        ci = list(self.test.confidence_interval(n, *sums)) if n >= 2 else None
        achieved = None
        if n:
            p = s.baseline_rate
            se = math.sqrt(2 * p * (1 - p) / n)
            achieved = 1 - _N.cdf(_N.inv_cdf(1 - s.alpha / 2) - abs(s.mde) / se)
        return {
            "control": s.control,
            "treatment": s.treatment,
            "mode": s.mode,
            "started_at": self.started_at,
            "plan": {
                "baseline_rate": s.baseline_rate,
                "mde": s.mde,
                "alpha": s.alpha,
                "power": s.power,
                "samples_per_arm": s.planned_n,
            },
            "arms": {
                arm: {
                    "version": s.version_of(arm),
                    "threshold": s.threshold_of(arm),
                    "ensemble": s.ensemble_of(arm),
                    "assigned": a.assigned,
                    "errors": a.errors,
                    "rewards": a.n,
                    "mean": a.mean,
                }
                for arm, a in self.arms.items()
            },
            "effect": effect,
            "confidence_interval": ci,
            "p_value": self.test.p_value,
            "power_achieved": achieved,
            "bandit": self.bandit.summary() if self.bandit else None,
            "decision": self.decision,
        }
