"""Watching what the gateway serves: alert rules and their remediations, the KPIs of the
releases it stopped itself, failure captures, metric providers, the flag store and registry
writes (off the event loop), and each model's status."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from cloud_serving.canary import Canary
from cloud_serving.core import GatewayCore
from cloud_serving.model_state import ModelState
from cloud_serving.quality import Calibration
from shared.alerts import AlertEvent, AlertState, CountSample, ValueSample, step
from shared.kpis import Mitigation
from shared.logs import pass_request_id
from shared.webhooks import notify, payload

log = logging.getLogger("tidegate.serving")
AlertFeed = tuple[dict[str, Calibration], dict[str, list[int]]]  # calibration, this tick's inputs


class Monitoring(GatewayCore):
    if TYPE_CHECKING:  # in the release operations

        def _end_canary(self, st: ModelState, *, promoted: bool, reason: str) -> None: ...

        def replication_status(self, name: str) -> dict[str, Any] | None: ...

        def _alert_feed(self, st: ModelState, now: datetime) -> AlertFeed | None: ...

    def _alerts(self, st: ModelState, now: datetime, done: list[tuple[str, str, Path | None]]) -> None:
        """Every alert rule of `st`, once per tick. Among replicas only the leading one judges
        them, on every replica's counts and labels (`_alert_feed`); the others judge none."""
        feed = self._alert_feed(st, now)
        if feed is None:
            return
        calibration, inputs = feed
        for cfg, rule in zip(st.config.alerts, st.rules, strict=True):
            watched = (
                st.production if cfg.version == "production" else st.canary.candidate if st.canary else None
            )
            samples: list[CountSample] | list[ValueSample]
            if watched is None:
                samples = []
            elif cfg.metric == "errors":
                samples = list(st.outcomes.get(watched, ()))
            else:
                series = st.values.setdefault((cfg.metric, watched), deque(maxlen=4096))
                if (
                    value := self._value(cfg.metric, watched, cfg.min_labels, calibration, inputs)
                ) is not None:
                    series.append(ValueSample(now, value))
                samples = list(series)
            state = st.alert_states.setdefault(cfg.name, AlertState())
            event = step(rule, samples, now, state)
            if event is None:
                continue
            remedy = self._remediate(st, event, watched, done) if event.status == "firing" else "none"
            self._note(
                st,
                f"alert {event.rule} {event.status} ({event.severity}) on {watched}: {event.detail}; "
                f"remediation: {remedy}",
            )
            record = {"model": st.name, "version": watched, "remediation": remedy}
            log.warning(
                "alert %s %s", event.rule, event.status, extra={"alert": payload(event, "gateway", record)}
            )
            if self.config.gateway.webhooks:
                self._notify(payload(event, "gateway", record))

        inputs.clear()

    @staticmethod
    def _value(
        metric: str,
        version: str,
        min_labels: int,
        calibration: dict[str, Calibration],
        inputs: dict[str, list[int]],
    ) -> float | None:
        """This tick's reading of a value metric for one version, or None without a basis."""
        if metric == "ood_ratio":
            seen, unusual = inputs.get(version, (0, 0))
            return unusual / seen if seen else None
        cal = calibration.get(version)
        if cal is None or len(cal) < min_labels:
            return None
        return cal.ece() if metric == "ece" else cal.accuracy()

    def _remediate(
        self, st: ModelState, event: AlertEvent, version: str | None, done: list[tuple[str, str, Path | None]]
    ) -> str:
        """The alert's action through the gateway's own release operations; what was done."""
        if event.action in ("rollback", "fallback"):
            self._mitigated(st, "alerts", f"alert {event.rule}: {event.detail}", event.at, version)
        if event.action == "rollback":
            if st.canary is not None and version == st.canary.candidate:
                self._end_canary(st, promoted=False, reason=f"alert {event.rule}: {event.detail}")
                done.append((st.name, "rolled back", None))
                return f"canary {version} rolled back"
            if st.history:
                previous = st.history.pop()
                st.production, st.weights = previous, {previous: 1.0}
                st.production_since = self.clock()
                done.append((st.name, "rolled back", None))
                return f"rolled back to {previous}"
            return "rollback impossible: no previous version"
        if event.action == "fallback":
            if st.fallback is None:
                return "fallback impossible: none configured"
            st.forced_fallback = f"alert {event.rule} at {event.at.isoformat()}"
            return "every request to the fallback until an operator clears it"
        if event.action == "scale_hint":
            depth = sum(getattr(b, "queue_depth", 0) for b in st.versions.values())
            return f"scale hint: add capacity for {st.name} (queue depth {depth}); no change made here"
        return "none configured"

    def _mitigated(
        self, st: ModelState, by: str, reason: str, now: datetime, version: str | None = None
    ) -> None:
        """Record a defective release stopped by the gateway itself (the KPIs' input): a
        canary, exposed since it began (escaped past its first step), or the production
        version, exposed since it took all traffic (escaped: it got through its release)."""
        c = st.canary
        if c is not None and version in (None, c.candidate):
            exposed_at, exposed, escaped = c.started_at or now, c.answered, c.state.step > 0
            subject = f"{st.name}:{c.candidate}"
        else:
            exposed_at = st.production_since or now
            exposed = sum(s.good + s.bad for s in st.outcomes.get(st.production, ()))
            escaped, subject = True, f"{st.name}:{st.production}"
        self.mitigations.append(Mitigation(subject, by, reason, exposed_at, now, exposed, escaped))

    def clear_fallback(self, name: str) -> None:
        st = self.model(name)
        if st.forced_fallback is not None:
            self._note(st, f"fallback cleared by an operator (was: {st.forced_fallback})")
        st.forced_fallback = None

    def _notify(self, body: dict[str, Any]) -> None:
        cfg = self.config.gateway
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(notify, cfg.webhooks, body, timeout_s=cfg.webhook_timeout_s)
        )
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def drain_notifications(self) -> None:
        """Wait for webhook deliveries in flight (tests, shutdown)."""
        if self._notifications:
            await asyncio.gather(*self._notifications, return_exceptions=True)

    def _write_flags(self) -> int:
        """Send queued flag writes to the flag store (blocking); a failure keeps the rest."""
        written = 0
        while self._flag_writes and self.flags is not None:
            key, value, why = self._flag_writes[0]
            try:
                self.flags.write(key, value, why)
            except (httpx.HTTPError, OSError, ValueError) as exc:
                log.warning("flag %s not written yet: %s", key, exc)
                return written
            self._flag_writes.popleft()
            written += 1
        return written

    async def flush_flags(self) -> int:
        if not self._flag_writes:
            return 0
        return await asyncio.to_thread(self._write_flags)

    async def flush_registry(self) -> int:
        """Send queued promotions to the registry off the event loop; retried on failure."""
        if self.registry is None or not self.registry.pending:
            return 0
        return await asyncio.to_thread(self.registry.flush)

    def record_shadow_diffs(self) -> list[Path]:
        """Write the large diffs the shadows sent back as failure captures (blocking: call it
        off the event loop). The recorder's rate limit and retention bound what reaches disk."""
        written = []
        for st in self.models.values():
            shadow = st.shadow
            while shadow is not None and shadow.captures:
                capture = shadow.captures.popleft()
                detail = {
                    "production_version": st.production,
                    "candidate_version": shadow.version,
                    **capture,
                    "kpis": shadow.stats.kpis(),
                }
                if (path := self.incidents.record("shadow_diff", st.name, detail)) is not None:
                    written.append(path)
        return written

    def poll_providers(self) -> None:
        """Read the running canaries' metric providers (Prometheus, HTTP JSON): blocking, with
        each provider's own timeout, so the tick loop calls it in a thread."""
        for st in list(self.models.values()):
            canary = st.canary
            if canary is not None and canary.spec.providers:
                if self._providers_http is None:
                    self._providers_http = httpx.Client(event_hooks={"request": [pass_request_id]})
                canary.poll(self._providers_http, self.clock())

    def status(self, name: str) -> dict[str, Any]:
        st = self.model(name)
        return {
            "model": name,
            "production": st.production,
            "post_processing": {"threshold": st.threshold, "ensemble": st.ensemble},
            "versions": sorted(st.versions),
            "weights": st.weights,
            "history": st.history,
            "fallback": st.fallback is not None,
            "running": st.running()[0].value,
            "shadow": None
            if st.shadow is None
            else {
                "candidate": st.shadow.version,
                "share": st.shadow.share,
                "active": st.shadow.active,
                "stopped_reason": st.shadow.stopped_reason,
                "task": st.shadow.spec.task.value,
                "verdict": st.shadow.verdict.as_dict(),
                "kpis": st.shadow.stats.kpis(),
            },
            "verdicts": {
                v: {"verdict": x.verdict, "reason": x.reason, "at": x.at} for v, x in st.verdicts.items()
            },
            "canary": None
            if st.canary is None
            else {
                "candidate": st.canary.candidate,
                "step": st.canary.state.step,
                "step_started_at": st.canary.state.step_started_at.isoformat(),
                "weight": st.canary.weight,
                "status": st.canary.state.status.value,
                "paused_reason": st.canary.state.paused_reason,
                "cohort": dict(st.canary.spec.cohort) or None,
                "last_decision": st.canary.last_reason,
                "providers": _readings(st.canary),
                "log": st.canary.log,
            },
            "experiment": st.experiment.summary() if st.experiment else None,
            "flags": self.flags.status() if self.flags is not None else None,
            "events": st.events[-50:],
            "forced_fallback": st.forced_fallback,
            "alerts": {name: a.status for name, a in st.alert_states.items()},
            "replication": self.replication_status(name),
        }


def _readings(canary: Canary) -> dict[str, dict[str, Any]]:
    """Each provider condition's latest reading, or why there is none."""
    out = {}
    for p in canary.spec.providers:
        read = canary.readings.get(p.name)
        out[p.name] = {"value": read[0].value if read else None, "error": canary.provider_errors.get(p.name)}
    return out
