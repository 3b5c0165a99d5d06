"""`tidegate agent run`: the on-device daemon.

It recovers whatever a crash left (the install engine's `recover`), then
serves the AWS IoT Jobs protocol over MQTT: asks for the next job, checks the
job document and the device-side preconditions (waiting, not failing, while
they do not hold), runs the install engine with its progress in
``statusDetails`` at a bounded rate, and reports SUCCEEDED, FAILED or
REJECTED. Beside it: health beacons and install receipts through a bounded
on-disk outbox, the thermal governor, the local batcher and the health
endpoint. Everything blocking (installs, SQLite, sysfs) stays off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from agent.batcher import DynamicBatcher, NoModelError, OnnxRunner, OverloadedError
from agent.config import AgentConfig
from agent.device import DeviceRoot
from agent.engine import Agent, InstallReport
from agent.errors import AgentError
from agent.health import HealthServer, SystemdNotifier
from agent.hooks import Hooks
from agent.jobs import JobsClient, JobsRejectedError, JobsTimeoutError
from agent.logtail import LogTail
from agent.logtail import owner as logtail_owner
from agent.mqtt import MqttSettings, PahoTransport, Transport
from agent.outbox import Outbox
from agent.quality import QualityProxy, top_probability
from agent.state import SlotStatus
from agent.thermal import SysfsThermal, ThermalPolicy, Throttle, next_level, throttle_for
from agent.vehicle import JsonFileVehicleState, evaluate_preconditions
from shared.fsutil import atomic_write_bytes
from shared.iotjobs import JobStatus
from shared.jobdoc import JobDocument, Preconditions
from shared.settings_file import first_error
from shared.sysmetrics import register_system_metrics
from shared.telemetry import (
    BEACON_TOPIC,
    LOG_TOPIC,
    RECEIPT_TOPIC,
    SCORE_BINS,
    DeviceLog,
    HealthBeacon,
    InferenceStats,
    InstallReceipt,
    score_bin,
)
from shared.version import TIDEGATE_VERSION

log = logging.getLogger("tidegate.agent")


@dataclass
class RunningJob:
    job_id: str
    version: int | None
    last_details: dict[str, str] | None = None
    log_mark: int = 0  # where the agent's log stood when the job began (its receipt's tail)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class AgentDaemon:
    def __init__(self, config: AgentConfig, *, transport: Transport | None = None) -> None:
        self.cfg = config
        self.dev = DeviceRoot(config.device.root)
        self.device = self.dev.load_config()
        thing = self.device.device_id
        m = config.mqtt
        settings = MqttSettings(
            host=m.host,
            port=m.port,
            client_id=thing,
            keepalive_s=m.keepalive_s,
            session_expiry_s=m.session_expiry_s,
            reconnect_min_s=m.reconnect_min_s,
            reconnect_max_s=m.reconnect_max_s,
            ca_file=m.ca_file,
            cert_file=m.cert_file,
            key_file=m.key_file,
            username=m.username,
            password=m.password,
        )
        if transport is None and m.transport == "awsiot":
            from agent.mqtt_awsiot import AwsIotTransport

            transport = AwsIotTransport(settings)
        self.transport: Transport = transport or PahoTransport(settings)
        self.jobs = JobsClient(self.transport, thing, timeout_s=config.jobs.reply_timeout_s)
        self.jobs.on_notify_next = lambda execution: self._wake_jobs.set()
        self.outbox = Outbox(self.dev.root / "telemetry.sqlite", max_messages=config.telemetry.queue_max)
        max_age = config.vehicle.max_age_s
        self.vehicle = JsonFileVehicleState(
            config.vehicle.state_file, max_age=None if max_age is None else timedelta(seconds=max_age)
        )
        self.thermal = SysfsThermal(config.thermal.root)
        self.policy = ThermalPolicy(
            tuple(config.thermal.thresholds_c), config.thermal.hysteresis_c, config.thermal.install_limit_c
        )
        b = config.batcher
        self.throttle = throttle_for(
            0, None, self.policy, base_batch=b.max_batch, base_concurrency=b.concurrency
        )
        self.temps: dict[str, float] = {}
        self.scores = [0] * SCORE_BINS
        self.restarts = 0  # agent starts since the active version was committed (see _count_start)
        self.quality = QualityProxy()
        self.unservable: str | None = None  # why the active slot is not served, when it is not
        self.logtail = LogTail()  # recent log lines: receipts' tails and log-pull uploads
        self.batcher = (
            DynamicBatcher(
                None,
                max_batch=b.max_batch,
                max_delay_ms=b.max_delay_ms,
                max_queue=b.max_queue,
                concurrency=b.concurrency,
            )
            if b.enabled
            else None
        )
        self.install_state = "idle"
        self.notifier = SystemdNotifier()
        self._wake_jobs = asyncio.Event()
        self._wake_outbox = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._setup_metrics()
        self.health = HealthServer(
            self.registry,
            live=lambda: not self._stop.is_set(),
            ready=self._ready,
            infer=self._infer_http if self.batcher else None,
        )

    # ---- metrics and health ---------------------------------------------------------------------

    def _setup_metrics(self) -> None:
        r = self.registry = CollectorRegistry()
        register_system_metrics(r, self.cfg.health.system_root)
        Gauge("tidegate_agent_mqtt_connected", "1 while connected to the broker", registry=r).set_function(
            lambda: float(self.transport.connected)
        )
        Gauge("tidegate_agent_throttle_level", "Thermal throttle level (0 = none)", registry=r).set_function(
            lambda: float(self.throttle.level)
        )
        Gauge(
            "tidegate_agent_outbox_depth", "Telemetry messages waiting for the broker", registry=r
        ).set_function(lambda: float(len(self.outbox)))
        Gauge(
            "tidegate_agent_telemetry_dropped", "Telemetry messages dropped at the outbox bound", registry=r
        ).set_function(lambda: float(self.outbox.dropped))
        self.m_temp = Gauge(
            "tidegate_agent_temperature_celsius", "Thermal zone temperature", ["zone"], registry=r
        )
        self.m_jobs = Counter("tidegate_agent_jobs_total", "Jobs finished by status", ["status"], registry=r)
        self.m_infer = Counter(
            "tidegate_agent_inference_requests_total", "Local inference requests", ["result"], registry=r
        )
        if self.batcher is not None:
            batcher = self.batcher
            Gauge(
                "tidegate_agent_batcher_queue_depth", "Requests waiting in the batcher", registry=r
            ).set_function(lambda: float(batcher.queue_depth))

    def _ready(self) -> tuple[bool, str]:
        if not self.transport.connected:
            why = getattr(self.transport, "last_error", None)
            return False, f"not connected to the broker: {why}" if why else "not connected to the broker"
        if self.batcher is not None and self.batcher.runner is None:
            return False, self.unservable or "no committed model loaded"
        return True, "ready"

    async def _infer_http(self, body: bytes) -> tuple[int, dict[str, Any]]:
        assert self.batcher is not None
        try:
            sample = np.asarray(json.loads(body)["input"], dtype=np.float32)
        except (ValueError, KeyError, TypeError):
            self.m_infer.labels("bad_request").inc()
            return 400, {"error": 'body must be JSON {"input": [...]} with one numeric sample'}
        try:
            out = await self.batcher.infer(sample)
        except OverloadedError as exc:
            self.m_infer.labels("overloaded").inc()
            return 429, {"error": str(exc)}
        except NoModelError as exc:
            return 503, {"error": str(exc)}
        except Exception as exc:
            self.m_infer.labels("error").inc()
            return 400, {"error": f"inference failed: {str(exc).splitlines()[0][:200]}"}
        self.m_infer.labels("ok").inc()
        if (top := top_probability(out)) is not None:  # a probability vector: the model's confidence
            self.scores[score_bin(top)] += 1
        self.quality.add(out, datetime.now().astimezone().hour)  # the device's local time of day
        return 200, {"outputs": {k: np.asarray(v).tolist() for k, v in out.items()}}

    # ---- lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        logging.getLogger().addHandler(self.logtail)
        logtail_owner.set(id(self.logtail))  # this daemon's records, in its tasks and threads
        try:
            await self._run()
        finally:
            logging.getLogger().removeHandler(self.logtail)

    async def _run(self) -> None:
        recovered = await asyncio.to_thread(Agent(self.dev.root).recover)
        if recovered is not None:
            log.info("recovered an interrupted install: %s", recovered.reason)
            await self._receipt(None, None, recovered)
        cfg = self.dev.load_config()
        if problems := Hooks(Path(cfg.hooks_dir) if cfg.hooks_dir else None).check():
            raise AgentError("; ".join(problems))  # a hook that cannot run would refuse every install
        checked = await asyncio.to_thread(Agent(self.dev.root).verify, repair=True)
        if not checked["ok"]:  # never serve a model that is not the signed one
            log.error(
                "the active slot is damaged at rest: %s; %s",
                checked["reason"],
                checked["repaired"] or f"reinstall {checked.get('reinstall')}",
            )
        await self._load_model()
        self.restarts = await asyncio.to_thread(self._count_start)
        self.transport.set_handlers(self._on_message, self._on_connect)
        self.transport.subscribe(self.jobs.subscriptions())
        await self.transport.start()
        await self.health.start(self.cfg.health.host, self.cfg.health.port)
        self.notifier.notify("READY=1")
        if self.batcher is not None:
            self.batcher.start()
        self._tasks = [
            asyncio.create_task(c)
            for c in (
                self._jobs_loop(),
                self._outbox_loop(),
                self._beacon_loop(),
                self._thermal_loop(),
                self._watchdog_loop(),
            )
        ]
        await self._stop.wait()
        self.notifier.notify("STOPPING=1")
        for t in self._tasks:
            t.cancel()
        _, pending = await asyncio.wait(self._tasks, timeout=10)
        for t in pending:
            log.error("task %s did not stop in time", t.get_coro())
        if self.batcher is not None:
            await self.batcher.stop()
        await self.health.stop()
        await self.transport.stop()
        self.outbox.close()

    def _on_connect(self) -> None:
        self._wake_jobs.set()
        self._wake_outbox.set()

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            if not self.jobs.handle(topic, payload):
                log.warning("ignored a message on an unexpected topic %s", topic)
        except Exception:  # a bad message must never stop the daemon
            log.exception("error handling a message on %s", topic)

    async def _load_model(self) -> None:
        if self.batcher is None:
            return
        active = self.dev.slots.active()
        if active is None:
            return
        status = (await asyncio.to_thread(self.dev.state.load)).slots[active].status
        if status not in (SlotStatus.GOOD, SlotStatus.TRIAL):
            # Found damaged at rest (or bad) with no good slot to switch to: serving it would
            # answer with bytes nobody signed. Nothing is served until a reinstall commits.
            self.batcher.reload(None)
            self.unservable = f"the active slot {active} is {status.value}: reinstall the model"
            log.error("not serving: %s", self.unservable)
            return
        self.unservable = None
        try:
            runner = await asyncio.to_thread(OnnxRunner, self.dev.slots.slot_dir(active))
        except Exception as exc:
            log.error("could not load the active model: %s", exc)
            return
        self.batcher.reload(runner)
        self.scores = [0] * SCORE_BINS  # the histogram describes the model now answering
        self.quality = QualityProxy()
        self.restarts = 0  # and the restarts count from its commit

    # ---- jobs ---------------------------------------------------------------------------------

    async def _jobs_loop(self) -> None:
        while not self._stop.is_set():  # 3.11's wait_for can swallow a cancel
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_jobs.wait(), self.cfg.jobs.poll_s)
            self._wake_jobs.clear()
            if not self.transport.connected:
                continue
            try:
                execution = await self.jobs.start_next(step_timeout_min=self.cfg.jobs.step_timeout_min)
            except (JobsTimeoutError, JobsRejectedError) as exc:
                log.warning("start-next failed: %s", exc)
                continue
            if execution is None:
                continue
            try:
                await self._run_job(execution)
            except Exception:
                log.exception("job %s failed unexpectedly", execution.get("jobId"))
            self._wake_jobs.set()

    def _unmet(self, pre: Preconditions) -> list[str]:
        free_mb = shutil.disk_usage(self.dev.root).free / (1 << 20)
        hottest = max(self.temps.values()) if self.temps else None
        unmet = evaluate_preconditions(
            pre, self.vehicle.read(), free_disk_mb=free_mb, hottest_c=hottest, install_limit_c=None
        )
        out = [f"{u.name}: {u.reason}" for u in unmet]
        if not self.throttle.installs_allowed:
            out.append(
                f"temperature: {hottest:.1f}°C at or above the install limit "
                f"{self.policy.install_limit_c:g}°C"
            )
        return out

    async def _run_job(self, execution: dict[str, Any]) -> None:
        job = RunningJob(str(execution.get("jobId")), execution.get("versionNumber"))
        job.log_mark = self.logtail.mark()
        try:
            doc = JobDocument.model_validate(execution.get("jobDocument"))
        except ValidationError as exc:
            why = first_error(exc, root="document")
            await self._finish_job(job, JobStatus.REJECTED, f"invalid job document: {why}")
            return
        if doc.operation == "tidegate.log-pull":
            await self._upload_log(job, doc.lines)
            return
        if doc.skus is not None and self.device.sku not in doc.skus:
            await self._finish_job(
                job,
                JobStatus.REJECTED,
                f"job is for SKUs {', '.join(doc.skus)}; this device is {self.device.sku}",
            )
            return
        while True:
            await self._wait_for_preconditions(job, doc.preconditions)
            report = await self._install(job, doc)
            if not report.deferred:
                break
            if self._stop.is_set():
                return  # the job stays IN_PROGRESS; after the restart start-next hands it back
            if report.retry_later:  # a device hook asked for later: wait, then try again
                log.info("install of %s deferred by a device hook: %s", job.job_id, report.reason)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.cfg.jobs.hook_retry_s)
        status = (
            JobStatus.SUCCEEDED if report.ok else JobStatus.REJECTED if report.refused else JobStatus.FAILED
        )
        # One line per outcome, for whoever reads the device's log (and the receipt's tail).
        level = logging.INFO if report.ok else logging.WARNING
        log.log(level, "job %s: %s %s: %s", job.job_id, doc.target, report.outcome.value, report.reason)
        await self._finish_job(job, status, report.reason, report, doc)
        if report.ok:
            await self._load_model()

    async def _wait_for_preconditions(self, job: RunningJob, pre: Preconditions) -> None:
        while unmet := self._unmet(pre):
            self.install_state = "waiting"
            await self._update(
                job, JobStatus.IN_PROGRESS, {"step": "waiting", "unmet": "; ".join(unmet)}, final=False
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.cfg.jobs.precondition_recheck_s)
            if self._stop.is_set():
                raise asyncio.CancelledError

    async def _install(self, job: RunningJob, doc: JobDocument) -> InstallReport:
        """Run the install engine in a thread. Progress goes to statusDetails through one sender:
        every phase change is reported, byte progress at most once per `progress_interval_s`,
        and a newer figure for the same phase replaces one not yet sent."""
        loop = asyncio.get_running_loop()
        last: dict[str, Any] = {"t": 0.0, "phase": ""}
        interval = self.cfg.jobs.progress_interval_s
        pending: list[dict[str, str]] = []
        wake = asyncio.Event()

        def enqueue(details: dict[str, str]) -> None:
            if pending and pending[-1]["step"] == details["step"]:
                pending[-1] = details
            else:
                pending.append(details)
            wake.set()

        def progress(phase: str, done: int, total: int) -> None:
            self.install_state = phase
            now = time.monotonic()
            if phase == last["phase"] and now - float(last["t"]) < interval:
                return
            last.update(t=now, phase=phase)
            details = {"step": phase}
            if total:
                details["progress"] = f"{done}/{total}"
            loop.call_soon_threadsafe(enqueue, details)

        async def sender() -> None:
            while not self._stop.is_set():  # 3.11's wait_for can swallow a cancel
                await wake.wait()
                wake.clear()
                while pending:
                    await self._update(job, JobStatus.IN_PROGRESS, pending.pop(0), final=False)

        def before_flip() -> str | None:
            if self._stop.is_set() or loop.is_closed():
                return "the agent is stopping"
            try:
                unmet = asyncio.run_coroutine_threadsafe(self._unmet_async(doc.preconditions), loop).result(5)
            except Exception:  # the loop went away or is too busy to answer: do not flip now
                return "could not re-check the preconditions"
            return "; ".join(unmet) if unmet else None

        agent = Agent(self.dev.root, on_progress=progress, before_flip=before_flip)
        task = asyncio.create_task(sender())
        try:
            return await asyncio.to_thread(agent.install, repository=doc.repository, target=doc.target)
        finally:
            self.install_state = "idle"
            with contextlib.suppress(TimeoutError):  # progress goes out before the final status
                await asyncio.wait_for(self._drain(pending), 10)
            task.cancel()

    @staticmethod
    async def _drain(pending: list[dict[str, str]]) -> None:
        while pending:
            await asyncio.sleep(0.01)

    async def _unmet_async(self, pre: Preconditions) -> list[str]:
        return self._unmet(pre)

    async def _update(
        self, job: RunningJob, status: JobStatus, details: dict[str, Any], *, final: bool
    ) -> bool:
        """Report to the jobs service. Non-final updates are best effort; a final one is retried
        until the broker takes it (if the agent dies first, start-next hands the job back and the
        idempotent install reports the same outcome)."""
        if not final and details == job.last_details:
            return True
        attempts = 0
        while not self._stop.is_set() or attempts == 0:
            attempts += 1
            try:
                reply = await self.jobs.update(
                    job.job_id,
                    status,
                    details,
                    expected_version=job.version,
                    step_timeout_min=self.cfg.jobs.step_timeout_min,
                )
                state = reply.get("executionState") or {}
                job.version = state.get("versionNumber", job.version)
                job.last_details = {k: str(v) for k, v in details.items()}
                return True
            except JobsRejectedError as exc:
                if exc.code == "VersionMismatch" and attempts < 5:
                    with contextlib.suppress(JobsTimeoutError, JobsRejectedError):
                        current = await self.jobs.describe(job.job_id)
                        job.version = (current or {}).get("versionNumber", job.version)
                    continue
                if exc.code == "RequestThrottled" and final and not self._stop.is_set():
                    # The service is shedding load: the outcome must still arrive, later.
                    wait = min(30.0, 0.5 * 2**attempts)
                    log.info("update of job %s throttled; retrying in %.1f s", job.job_id, wait)
                    await asyncio.sleep(wait)
                    continue
                log.warning("update of job %s to %s rejected: %s", job.job_id, status, exc)
                return False
            except JobsTimeoutError as exc:
                if not final or self._stop.is_set():
                    return False
                log.info("update of job %s not acknowledged (%s); retrying", job.job_id, exc)
                await asyncio.sleep(min(30.0, 0.5 * attempts))
        return False

    async def _finish_job(
        self,
        job: RunningJob,
        status: JobStatus,
        reason: str,
        report: InstallReport | None = None,
        doc: JobDocument | None = None,
    ) -> None:
        details: dict[str, Any] = {"reason": reason}
        if report is not None:
            details["outcome"] = report.outcome.value
            if report.version:
                details["version"] = report.version
            st = report.figures.get("self_test") or {}
            for key in ("p95_ms", "peak_rss_mb"):
                if st.get(key) is not None:
                    details[f"selftest_{key}"] = f"{st[key]:.3f}"
        await self._update(job, status, details, final=True)
        self.m_jobs.labels(status.value).inc()
        await self._receipt(
            job.job_id,
            doc.target if doc else None,
            report,
            rejected_reason=reason if status is JobStatus.REJECTED else None,
            log_tail=self.logtail.since(job.log_mark) if status is not JobStatus.SUCCEEDED else [],
        )

    async def _upload_log(self, job: RunningJob, lines: int) -> None:
        """A `tidegate.log-pull` job: the recent log (redacted, at most 64 KiB) to the server
        over the device's own MQTT connection, then SUCCEEDED with how many lines went."""
        tail = self.logtail.recent(lines=lines)
        seq, now = self.outbox.next_seq(), _utcnow()
        message = DeviceLog(seq=seq, device_id=self.device.device_id, at=now, job_id=job.job_id, lines=tail)
        topic = LOG_TOPIC.format(thing=self.device.device_id)
        await asyncio.to_thread(self.outbox.put, topic, message.model_dump_json().encode())
        self._wake_outbox.set()
        done = {"reason": f"uploaded {len(tail)} log lines"}
        await self._update(job, JobStatus.SUCCEEDED, done, final=True)
        self.m_jobs.labels(JobStatus.SUCCEEDED.value).inc()

    # ---- telemetry ------------------------------------------------------------------------------

    async def _receipt(
        self,
        job_id: str | None,
        target: str | None,
        report: InstallReport | None,
        *,
        rejected_reason: str | None = None,
        log_tail: list[str] | None = None,
    ) -> None:
        outcome: str = "rejected" if rejected_reason else report.outcome.value if report else "failed"
        receipt = InstallReceipt(
            seq=self.outbox.next_seq(),
            device_id=self.device.device_id,
            at=_utcnow(),
            job_id=job_id,
            target=target,
            version=report.version if report else None,
            outcome=outcome,  # type: ignore[arg-type]
            reason=rejected_reason or (report.reason if report else ""),
            figures=report.figures if report else {},
            log_tail=log_tail or [],
        )
        await asyncio.to_thread(
            self.outbox.put,
            RECEIPT_TOPIC.format(thing=self.device.device_id),
            receipt.model_dump_json().encode(),
        )
        self._wake_outbox.set()

    def _count_start(self) -> int:
        """This start, counted against the active version (`starts.json`, written atomically):
        the restarts a beacon reports since that version was committed, which a campaign's
        relative wave gate compares between updated devices and the rest."""
        state = self.dev.state.load()
        active = self.dev.slots.active()
        bundle = state.slots[active].bundle if active else None
        version = bundle.version if bundle else None
        path = self.dev.root / "starts.json"
        try:
            seen = json.loads(path.read_text())
        except (OSError, ValueError):
            seen = {}
        same = isinstance(seen, dict) and seen.get("version") == version
        starts = int(seen.get("starts", 0)) + 1 if same else 1
        atomic_write_bytes(path, json.dumps({"version": version, "starts": starts}).encode())
        return starts - 1

    def beacon(self) -> HealthBeacon:
        state = self.dev.state.load()
        active = self.dev.slots.active()
        bundle = state.slots[active].bundle if active else None
        b = self.batcher
        return HealthBeacon(
            seq=self.outbox.next_seq(),
            device_id=self.device.device_id,
            sku=self.device.sku,
            at=_utcnow(),
            agent_version=TIDEGATE_VERSION,
            active_version=bundle.version if bundle else None,
            active_slot=active,
            install_state=self.install_state,
            temperatures_c=dict(self.temps),
            throttle_level=self.throttle.level,
            inference=InferenceStats(
                count=b.stats.count,
                p50_ms=b.latency_ms(0.5),
                p95_ms=b.latency_ms(0.95),
                errors=b.stats.errors,
                score_histogram=list(self.scores) if any(self.scores) else [],
                quality=self.quality.snapshot(),
            )
            if b
            else InferenceStats(),
            free_disk_mb=shutil.disk_usage(self.dev.root).free / (1 << 20),
            dropped_telemetry=self.outbox.dropped,
            restarts=self.restarts,
        )

    async def _beacon_loop(self) -> None:
        while not self._stop.is_set():  # 3.11's wait_for can swallow a cancel
            beacon = await asyncio.to_thread(self.beacon)
            await asyncio.to_thread(
                self.outbox.put,
                BEACON_TOPIC.format(thing=self.device.device_id),
                beacon.model_dump_json().encode(),
            )
            self._wake_outbox.set()
            await asyncio.sleep(self.cfg.telemetry.beacon_interval_s)

    async def _outbox_loop(self) -> None:
        """Send queued telemetry in order, one message in flight, deleting each once acknowledged."""
        while not self._stop.is_set():  # 3.11's wait_for can swallow a cancel
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_outbox.wait(), 5.0)
            self._wake_outbox.clear()
            while self.transport.connected:
                batch = await asyncio.to_thread(self.outbox.peek, 1)
                if not batch:
                    break
                msg = batch[0]
                if not await self.transport.publish(msg.topic, msg.payload):
                    break
                await asyncio.to_thread(self.outbox.ack, msg.id)

    # ---- thermal and watchdog ---------------------------------------------------------------------

    def apply_temperatures(self, temps: dict[str, float]) -> Throttle:
        self.temps = temps
        hottest = max(temps.values()) if temps else None
        level = next_level(self.throttle.level, hottest, self.policy)
        b = self.cfg.batcher
        self.throttle = throttle_for(
            level, hottest, self.policy, base_batch=b.max_batch, base_concurrency=b.concurrency
        )
        if self.batcher is not None:
            self.batcher.set_limits(
                max_batch=self.throttle.max_batch,
                concurrency=self.throttle.concurrency,
                pacing_ms=self.throttle.pacing_ms,
            )
        for zone, t in temps.items():
            self.m_temp.labels(zone).set(t)
        return self.throttle

    async def _thermal_loop(self) -> None:
        while not self._stop.is_set():  # 3.11's wait_for can swallow a cancel
            temps = await asyncio.to_thread(self.thermal.read)
            before = self.throttle.level
            after = self.apply_temperatures(temps).level
            if after != before:
                log.info("thermal throttle level %d -> %d (%s)", before, after, temps)
                self._wake_jobs.set()
            await asyncio.sleep(self.cfg.thermal.poll_s)

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        while not self._stop.is_set():  # 3.11's wait_for can swallow a cancel
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)
