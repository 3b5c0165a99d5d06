"""Gateway replicas: one release state shared by every gateway process, one replica deciding.

Without it two gateways behind a load balancer each ran their own canary on their own half of
the traffic, and a restart forgot a canary in flight. With `[gateway.replication]`:

- the **release state** of each model (production, history, weights, salt, the forced
  fallback, the canary with its spec, step and log) is one row in PostgreSQL with a revision
  number. Every replica adopts a revision it has not seen, and writes its own changes (an
  operator's call, a decision, an alert's rollback) only on top of the revision it last saw
  (compare-and-set): two replicas changing one model at the same moment cannot both win; the
  loser takes the winner's state and its operator gets a 409;
- **one replica decides** for each model: the one holding the row's lease (`lease_s`, renewed
  every tick, on the database's clock). Only it runs the canary's gates, on the samples of
  every replica: each replica sends what its canary recorded since its last tick (outcomes,
  latencies) as one row per side, numbered per replica so a row sent twice after an outage
  counts once;
- a replica routes only from the state it adopted: the same weights and salt give every
  caller key the same version on every replica (`routing.bucket`). A revision naming a
  version this replica has not loaded is not adopted, and the replica is not ready;
- a replica that starts, or restarts, adopts the stored state before it serves: a canary in
  flight resumes at its step with its bake clock, on the samples already stored.

Why PostgreSQL and not Redis or the fleet server's registry: the fleet server's replicas run
on it already (one engine to operate), transactions give the compare-and-set and the leases
on one clock, and the samples survive a restart of everything.

Shadows replicate as a shared description in the release state (id, version, share, budget):
every replica runs its own mirror of it (a child process, or the configured shadow worker) and
sends each tick its mirror's comparisons so far (the diff accumulators are sums, so they
combine exactly, `cloud_serving.diffs.absorb`); every replica's verdict and KPIs are on every
mirror's comparisons, the leading replica alone ends a shadow whose verdict fails, and an
operator's stop on any replica makes the verdict final on what every mirror had sent. The
verdicts travel in the release state, so a canary's shadow gate reads the same verdict on
every replica.

A/B experiments replicate alike (arm counts instead of samples; a request id names its arm
under a MAC, so a reward may reach any replica), and so do bandits: every replica, leading
or not, reads the arms' counts each tick and draws its Thompson choices from the posterior
of every replica's rewards. An experiment that sets flags carries the flags' earlier values
in the release state, so the replica that ends it (the leader) restores them in the flag
store the replicas share (the fleet server's).

Monitoring replicates too: every replica sends each tick what its alert rules read (per
version, requests that succeeded and failed, inputs seen and out of distribution) and the
late labels it took, on one stream per model (`ALERTS`); only the leading replica evaluates
the alert rules, on every replica's counts (the rules' states travel in the release state,
so a new leader goes on from them instead of firing again), and only after a good exchange (a replica that
does not lead, or could not reach the store, takes no alert decision on its own part of the
traffic). A classifier's answer on a replicated gateway carries what its label is judged
against (version, class, score) sealed under a key the replicas share in the release state,
so a label may reach any replica; the leader counts each request id's label once, in the
combined calibration its alerts read and in the canary's accuracy. A trajectory's answer
carries its points likewise (up to `SEALED_POINTS_MAX` values), for the canary's ADE and FDE.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import logging
import math
import os
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    Identity,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from cloud_serving.canary import (
    METRICS,
    SIDES,
    Canary,
    Recorded,
    spec_from_dict,
    spec_to_dict,
    state_from_dict,
    state_to_dict,
)
from cloud_serving.config import ReplicationConfig
from cloud_serving.core import GatewayCore
from cloud_serving.errors import DuplicateGatewayError, ReleaseError, ReplicationError
from cloud_serving.experiments import ARM_FIELDS, ArmStats, Experiment
from cloud_serving.experiments import spec_from_dict as experiment_spec_from_dict
from cloud_serving.experiments import spec_to_dict as experiment_spec_to_dict
from cloud_serving.flags import UNSET
from cloud_serving.model_state import ModelState
from cloud_serving.quality import Calibration
from cloud_serving.shadow import ShadowBudget, ShadowMirror, ShadowVerdict, budget_from_dict, budget_to_dict
from shared.alerts import AlertState, CountSample
from shared.gates import Decision

log = logging.getLogger("tidegate.serving.replication")

metadata = MetaData()
replicas_table = Table(
    "gateway_replicas",
    metadata,
    Column("replica_id", String(64), primary_key=True),
    Column("nonce", String(32), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
)
releases_table = Table(
    "gateway_releases",
    metadata,
    Column("model", String(128), primary_key=True),
    Column("revision", Integer, nullable=False),
    Column("state", Text, nullable=False),
    Column("owner", String(64)),
    Column("lease_until", DateTime(timezone=True)),
    Column("updated_by", String(64)),
)
samples_table = Table(
    "gateway_samples",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("model", String(128), nullable=False),
    Column("canary", String(32), nullable=False),
    Column("replica", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),  # microseconds: unique per replica across restarts
    Column("side", String(16), nullable=False),
    Column("last_at", Float, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
    UniqueConstraint("model", "canary", "replica", "seq", "side"),
)
# A row's insert may commit after a later-stamped one; re-reading this far back (and skipping
# rows already seen) loses none of them.
REREAD_S = 30.0
UNSENT_MAX = 10_000  # rows held while the store is out of reach (a few per model and tick)
ALERTS = "~alerts"  # each model's monitoring stream (no canary or experiment id has a "~")
ALERTS_KEEP_S = 3600.0  # the longest alert window a new leader must be able to re-read
SCHEMA_LOCK = 0x7467_6777  # the advisory lock creating the tables is taken under ("tggw")
SHADOW_SIDE = "s"  # a shadow's rows: side "s" + the mirror's id
LABELLED_MAX = 200_000  # request ids whose label the leader has counted (the oldest go first)


def brief(exc: BaseException) -> str:
    """An exception in one line (a driver's message runs to several)."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def _db_now() -> Any:
    return func.timezone("utc", func.now()).cast(DateTime(timezone=True))


# ---- the state, pure --------------------------------------------------------------------------


def routing_state(st: ModelState) -> dict[str, Any]:
    """What every replica must agree on to route and judge alike."""
    c = st.canary
    return {
        "production": st.production,
        "history": list(st.history),
        "weights": dict(sorted(st.weights.items())),
        "salt": st.salt,
        "seal_key": st.seal_key,
        "forced_fallback": st.forced_fallback,
        "threshold": st.threshold,
        "ensemble": st.ensemble,
        "shadow": None
        if (sh := st.shadow) is None or not sh.active
        else {
            "id": sh.id,
            "version": sh.version,
            "share": sh.share,
            "budget": budget_to_dict(sh.budget),
            "queue_max": sh.queue_max,
        },
        "verdicts": {v: x.as_dict() for v, x in sorted(st.verdicts.items())},
        # the alert rules' states: a replica that takes the lead goes on from them (a rule that
        # is firing stays firing, and notifies nobody again)
        "alerts": {
            name: [a.status, a.since.isoformat() if a.since else None]
            for name, a in sorted(st.alert_states.items())
            if a.status != "ok"
        },
        "experiment": None
        if (e := st.experiment) is None
        else {
            "id": e.id,
            "spec": experiment_spec_to_dict(e.spec),
            "started_at": e.started_at,
            "p_value": e.test.p_value,
            # what its flags were before it set them: whichever replica ends it restores them
            "flag_restore": {k: None if v is UNSET else {"value": v} for k, v in st.flag_restore.items()},
        },
        "canary": None
        if c is None
        else {
            "id": c.id,
            "candidate": c.candidate,
            "production": c.production,
            "spec": spec_to_dict(c.spec),
            "state": state_to_dict(c.state),
            "started_at": c.started_at.isoformat() if c.started_at else None,
            "log": list(c.log),
            "last_reason": c.last_reason,
        },
    }


def encode(state: dict[str, Any]) -> str:
    return json.dumps(state, sort_keys=True, separators=(",", ":"))


def settled(state: dict[str, Any]) -> str:
    """What a change of the state is judged by: all of it but the canary's latest reason, which
    a holding canary rewrites every tick ("bake: 3 s left"); it travels with the next real
    change instead of costing a revision, a write and every replica's re-adoption per tick."""
    if state["canary"] is None:
        return encode(state)
    return encode({**state, "canary": {**state["canary"], "last_reason": None}})


def unloaded(st: ModelState, state: dict[str, Any]) -> list[str]:
    """Versions the state routes to that this replica has not loaded."""
    named = {state["production"], *state["weights"], *(state["ensemble"] or {})}
    if state.get("shadow"):
        named.add(state["shadow"]["version"])
    if state["canary"] is not None:
        named.add(state["canary"]["candidate"])
    if state["experiment"] is not None:
        spec = experiment_spec_from_dict(state["experiment"]["spec"])
        for arm in (spec.control, spec.treatment):
            named.update(spec.ensemble_of(arm) or [spec.version_of(arm)])
    return sorted(v for v in named if v not in st.versions)


def adopt(st: ModelState, state: dict[str, Any], now: datetime) -> None:
    """Make the local model state the stored one. A canary already running here keeps its
    recorder (what this replica measured and has not sent yet)."""
    if state["production"] != st.production:
        st.production_since = now
    st.production = state["production"]
    st.history = list(state["history"])
    st.weights = dict(state["weights"])
    st.salt = state["salt"]
    st.seal_key = state.get("seal_key") or st.seal_key  # a row written before there was one
    st.forced_fallback = state["forced_fallback"]
    st.threshold = state["threshold"]
    st.ensemble = state["ensemble"]  # after production, whose change clears it
    st.verdicts = {v: ShadowVerdict.from_dict(d) for v, d in state.get("verdicts", {}).items()}
    if "alerts" in state:  # a row written before they travelled keeps what this replica has
        st.alert_states = {
            name: AlertState(status, datetime.fromisoformat(since) if since else None)
            for name, (status, since) in state["alerts"].items()
        }
    e = state["experiment"]
    st.flag_restore = (
        {k: UNSET if v is None else v["value"] for k, v in (e.get("flag_restore") or {}).items()} if e else {}
    )
    if e is None:
        st.experiment = None
    elif st.experiment is not None and st.experiment.id == e["id"]:
        st.experiment.test.p_value = min(st.experiment.test.p_value, e["p_value"])
    else:
        st.experiment = Experiment(experiment_spec_from_dict(e["spec"]), e["started_at"], id=e["id"])
        st.experiment.test.p_value = e["p_value"]
        st.assigned.clear()
    c = state["canary"]
    if c is None:
        st.canary = None
        return
    rollout = state_from_dict(c["state"])
    if st.canary is not None and st.canary.id == c["id"]:
        st.canary.state = rollout
    else:
        redactor = st.canary.redactor if st.canary is not None else None
        st.canary = Canary(
            st.name,
            c["production"],
            c["candidate"],
            spec_from_dict(c["spec"]),
            rollout,
            started_at=datetime.fromisoformat(c["started_at"]) if c["started_at"] else None,
            id=c["id"],
        )
        if redactor is not None:
            st.canary.redactor = redactor
    st.canary.log[:] = c["log"]
    st.canary.last_reason = c["last_reason"]


def seal(request_id: str, experiment: Experiment, arm: str) -> str:
    """A request id that names its experiment arm, with a MAC keyed by the experiment's id
    (shared by the replicas, not shown to callers), so a caller cannot pick the arm its
    reward counts for."""
    index = 0 if arm == experiment.spec.control else 1
    body = f"{request_id}.{index}"
    mac = hmac.new(experiment.id.encode(), body.encode(), hashlib.sha256).hexdigest()[:12]
    return f"{body}.{mac}"


def unseal(request_id: str, experiment: Experiment) -> str | None:
    """The arm a sealed request id names, or None (not sealed, or sealed by another experiment)."""
    parts = request_id.split(".")
    if len(parts) != 3 or parts[1] not in ("0", "1"):
        return None
    expect = seal(
        parts[0], experiment, experiment.spec.control if parts[1] == "0" else experiment.spec.treatment
    )
    if not hmac.compare_digest(expect, request_id):
        return None
    return experiment.spec.control if parts[1] == "0" else experiment.spec.treatment


def _seal(request_id: str, key: str, facts: list[Any]) -> str:
    """A request id that carries `facts` (what its late truth is judged against) under a MAC
    keyed by the model's shared seal key, so any replica can take the truth and a caller
    cannot invent an answer to judge."""
    raw = json.dumps(facts, separators=(",", ":"))
    body = f"{request_id}~{base64.urlsafe_b64encode(raw.encode()).decode().rstrip('=')}"
    mac = hmac.new(key.encode(), body.encode(), hashlib.sha256).hexdigest()[:16]
    return f"{body}~{mac}"


def _unseal(request_id: str, key: str) -> list[Any] | None:
    parts = request_id.split("~")
    if len(parts) != 3:
        return None
    body = f"{parts[0]}~{parts[1]}"
    mac = hmac.new(key.encode(), body.encode(), hashlib.sha256).hexdigest()[:16]
    if not hmac.compare_digest(mac, parts[2]):
        return None
    try:
        facts = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    return facts if isinstance(facts, list) else None


def seal_answer(request_id: str, key: str, version: str, predicted: int, confidence: float) -> str:
    """A classifier's request id carrying its version, the class it answered and its score."""
    return _seal(request_id, key, [version, predicted, round(float(confidence), 6)])


def unseal_answer(request_id: str, key: str) -> tuple[str, int, float] | None:
    """(version, class, score) a sealed request id carries, or None (not sealed, or forged)."""
    facts = _unseal(request_id, key)
    try:
        version, predicted, confidence = facts  # type: ignore[misc]
        return str(version), int(predicted), float(confidence)
    except (ValueError, TypeError):
        return None


SEALED_POINTS_MAX = 256  # a trajectory answer up to this many values travels in its request id


def seal_path(request_id: str, key: str, version: str, points: np.ndarray[Any, Any]) -> str:
    """A trajectory's request id carrying its version and its points (float32), so its truth
    may be posted to any replica. Longer answers are not sealed (`SEALED_POINTS_MAX`): their
    truth is taken only by the replica that answered."""
    data = base64.urlsafe_b64encode(np.ascontiguousarray(points, dtype="<f4").tobytes()).decode()
    return _seal(request_id, key, [version, list(points.shape), data.rstrip("=")])


def unseal_path(request_id: str, key: str) -> tuple[str, np.ndarray[Any, Any]] | None:
    """(version, points) a sealed trajectory request id carries, or None."""
    facts = _unseal(request_id, key)
    try:
        version, shape, data = facts  # type: ignore[misc]
        raw = base64.urlsafe_b64decode(str(data) + "=" * (-len(str(data)) % 4))
        points = np.frombuffer(raw, dtype="<f4").reshape([int(n) for n in shape])
        return str(version), points.astype(np.float64)
    except (ValueError, TypeError):
        return None


def inner_id(request_id: str) -> str:
    """The request id without its answer seal (what an experiment's seal is checked on)."""
    return request_id.split("~", 1)[0]


def pack(arrays: dict[str, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]) -> bytes:
    buf = io.BytesIO()
    named: dict[str, Any] = {
        f"{m}.{p}": a for m, (at, v) in arrays.items() for p, a in (("at", at), ("v", v))
    }
    np.savez(buf, **named)
    return buf.getvalue()


def unpack(data: bytes) -> dict[str, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {m: (z[f"{m}.at"], z[f"{m}.v"]) for m in METRICS if f"{m}.at" in z}


@dataclass
class Gathered(ABC):
    """What the deciding replica has read of one canary's or experiment's rows: which rows,
    from which replicas, up to when (the database's clock), so each row counts once."""

    id: str
    seen: set[int] = field(default_factory=set)
    replicas: set[str] = field(default_factory=set)
    read_until: datetime | None = None

    def take(self, rows: list[tuple[int, str, str, bytes]], read_at: datetime) -> None:
        for row_id, replica, side, data in rows:
            if row_id not in self.seen:
                self.seen.add(row_id)
                self.replicas.add(replica)
                self.row(side, data)
        self.read_until = read_at

    @abstractmethod
    def row(self, side: str, data: bytes) -> None:
        """Add one row's data (a canary side's samples, or an experiment's arm counts)."""


@dataclass
class Combined(Gathered):
    """Every replica's samples of one canary."""

    parts: dict[str, dict[str, list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]]] = field(
        default_factory=lambda: {side: defaultdict(list) for side in SIDES}
    )

    def row(self, side: str, data: bytes) -> None:
        for m, pair in unpack(data).items():
            self.parts[side][m].append(pair)

    def sides(self, horizon: float) -> dict[str, Recorded]:
        """The samples newer than `horizon` (a timestamp), per side; older ones are dropped."""
        out = {}
        for side in SIDES:
            merged = {}
            for m, pairs in self.parts[side].items():
                at = np.concatenate([p[0] for p in pairs]) if pairs else np.empty(0)
                value = np.concatenate([p[1] for p in pairs]) if pairs else np.empty(0)
                keep = at >= horizon
                at, value = at[keep], value[keep]
                self.parts[side][m] = [(at, value)]
                merged[m] = (at, value)
            for m in METRICS:
                merged.setdefault(m, (np.empty(0), np.empty(0)))
            out[side] = Recorded.of(merged)
        return out


@dataclass
class CombinedArms(Gathered):
    """Every replica's counts of one experiment."""

    arms: dict[str, ArmStats] = field(default_factory=dict)

    def row(self, side: str, data: bytes) -> None:
        for arm, delta in json.loads(data).items():
            a = self.arms.setdefault(arm, ArmStats())
            for f in ARM_FIELDS:  # a row from before a field existed lacks it
                setattr(a, f, getattr(a, f) + type(getattr(a, f))(delta.get(f, 0)))


@dataclass
class CombinedShadow(Gathered):
    """Every replica's mirror of one shadow: each row is a mirror's comparisons so far (its
    side names the mirror), so the latest of each is all of it."""

    latest: dict[str, dict[str, Any]] = field(default_factory=dict)  # mirror id → state

    def row(self, side: str, data: bytes) -> None:
        state = json.loads(data)
        mirror = side.removeprefix(SHADOW_SIDE)
        known = self.latest.get(mirror)
        if known is None or _compared(state) >= _compared(known):
            self.latest[mirror] = state


def _compared(state: dict[str, Any]) -> int:
    return int(state["compared"]) + int(state["errors"])


@dataclass
class CombinedAlerts(Gathered):
    """Every replica's monitoring rows of one model, for the leader's alert rules: each row
    handed on once (`pop`), each request id's label counted once."""

    pending: list[dict[str, Any]] = field(default_factory=list)
    labelled: OrderedDict[str, None] = field(default_factory=OrderedDict)
    calibration: dict[str, Calibration] = field(default_factory=dict)

    def row(self, side: str, data: bytes) -> None:
        self.pending.append(json.loads(data))

    def pop(self) -> list[dict[str, Any]]:
        rows, self.pending = sorted(self.pending, key=lambda r: float(r["at"])), []
        for r in rows:
            fresh = []
            for label in r.get("labels", []):
                if label[0] in self.labelled:
                    continue  # posted again, to another replica: counted once
                self.labelled[label[0]] = None
                fresh.append(label)
            while len(self.labelled) > LABELLED_MAX:
                self.labelled.popitem(last=False)
            r["labels"] = fresh
            paths = []
            for truth in r.get("paths", []):  # a trajectory's truth, likewise once
                if truth[0] not in self.labelled:
                    self.labelled[truth[0]] = None
                    paths.append(truth)
            r["paths"] = paths
            while len(self.labelled) > LABELLED_MAX:
                self.labelled.popitem(last=False)
            for _, version, confidence, correct, _at in fresh:
                self.calibration.setdefault(version, Calibration()).add(float(confidence), bool(correct))
        return rows


# ---- the store, I/O ---------------------------------------------------------------------------


@dataclass
class Outgoing:
    """One side's samples of one canary, sent once (re-sent after an outage, counted once)."""

    model: str
    canary: str
    seq: int
    side: str
    last_at: float
    data: bytes


@dataclass
class Pulled:
    rows: dict[str, tuple[int, str]]  # model → (revision, state)
    led: set[str]  # the models this replica decides for
    samples: dict[tuple[str, str], list[tuple[int, str, str, bytes]]]  # (model, stream) → rows
    read_at: datetime


class ReleaseStore:
    """The shared release state in PostgreSQL: registration, per-model leases, state rows with
    a revision, and the canaries' samples. Every method is one transaction."""

    def __init__(self, cfg: ReplicationConfig) -> None:
        self.cfg = cfg
        self.replica_id = cfg.replica_id or f"{socket.gethostname()}-{os.getpid()}"[:64]
        self.nonce = uuid.uuid4().hex
        self.engine: Engine = create_engine(
            cfg.url, pool_pre_ping=True, connect_args={"connect_timeout": max(1, int(cfg.timeout_s))}
        )

    def describe(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def check(self) -> None:
        """Reach the store once (before serving: a wrong URL is an error at once)."""
        try:
            with self.engine.connect() as c:
                c.execute(select(1))
        except Exception as exc:  # drivers fail in many types (a SQL_ASCII database: a TypeError)
            raise ReplicationError(f"the gateways' shared store {self.describe()}: {brief(exc)}") from exc

    def open(self, initial: dict[str, str], *, wait_s: float | None = None) -> None:
        """Create the tables if missing, register this replica (refusing a live one's id) and
        seed each model's row from the configuration where none is stored yet."""
        try:
            with self.engine.begin() as c:
                # Two replicas starting at once on a fresh database would both see no tables
                # and both create them (one fails on PostgreSQL's catalogue): one at a time.
                c.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK)))
                metadata.create_all(c, checkfirst=True)
            deadline = time.monotonic() + (2 * self.cfg.lease_s if wait_s is None else wait_s)
            while not self._register():
                if time.monotonic() >= deadline:
                    raise DuplicateGatewayError(
                        f"gateway replica id {self.replica_id!r} is live in {self.describe()}: give each "
                        "replica its own [gateway.replication] replica_id"
                    )
                time.sleep(0.5)
            with self.engine.begin() as c:
                for model, state in initial.items():
                    c.execute(
                        pg_insert(releases_table)
                        .values(model=model, revision=1, state=state, updated_by=self.replica_id)
                        .on_conflict_do_nothing(index_elements=["model"])
                    )
        except SQLAlchemyError as exc:
            raise ReplicationError(f"the gateways' shared store {self.describe()}: {brief(exc)}") from exc

    def _register(self) -> bool:
        stale = _db_now() - timedelta(seconds=self.cfg.lease_s)
        with self.engine.begin() as c:
            stmt = pg_insert(replicas_table).values(
                replica_id=self.replica_id, nonce=self.nonce, heartbeat_at=_db_now()
            )
            upsert = stmt.on_conflict_do_update(
                index_elements=["replica_id"],
                set_={"nonce": self.nonce, "heartbeat_at": _db_now()},
                where=replicas_table.c.heartbeat_at < stale,
            ).returning(replicas_table.c.replica_id)
            return c.execute(upsert).first() is not None

    def exchange(
        self,
        outgoing: list[Outgoing],
        reads: dict[tuple[str, str], datetime | None],
        served: list[str],
        everyone: frozenset[tuple[str, str]] = frozenset(),
    ) -> Pulled:
        """Heartbeat, send this replica's samples, take or renew the leases of the `served`
        models, read their state and, for each `reads` entry ((model, canary, experiment or
        `ALERTS`) → read since), the rows stored, for the models this replica leads (and for
        the streams in `everyone` whoever leads: a bandit's counts, which every replica's
        choices draw on)."""
        now = _db_now()
        with self.engine.begin() as c:
            beat = c.execute(
                update(replicas_table)
                .where(replicas_table.c.replica_id == self.replica_id, replicas_table.c.nonce == self.nonce)
                .values(heartbeat_at=now)
                .returning(replicas_table.c.replica_id)
            ).first()
            if beat is None:
                raise DuplicateGatewayError(f"gateway replica {self.replica_id!r} lost its registration")
            if outgoing:
                c.execute(
                    pg_insert(samples_table).on_conflict_do_nothing(),
                    [
                        {
                            "model": o.model,
                            "canary": o.canary,
                            "replica": self.replica_id,
                            "seq": o.seq,
                            "side": o.side,
                            "last_at": o.last_at,
                            "data": o.data,
                        }
                        for o in outgoing
                    ],
                )
            led = set(
                c.scalars(
                    update(releases_table)
                    .where(
                        releases_table.c.model.in_(served),  # not another deployment's models
                        or_(
                            releases_table.c.owner == self.replica_id,
                            releases_table.c.owner.is_(None),
                            releases_table.c.lease_until < now,
                        ),
                    )
                    .values(owner=self.replica_id, lease_until=now + timedelta(seconds=self.cfg.lease_s))
                    .returning(releases_table.c.model)
                )
            )
            rows = {
                m: (rev, state)
                for m, rev, state in c.execute(
                    select(releases_table.c.model, releases_table.c.revision, releases_table.c.state).where(
                        releases_table.c.model.in_(served)
                    )
                )
            }
            read_at: datetime = c.execute(select(now)).scalar_one()
            samples = {
                (m, stream): self._samples(c, m, stream, since)
                for (m, stream), since in reads.items()
                if m in led or (m, stream) in everyone
            }
        return Pulled(rows, led, samples, read_at)

    @staticmethod
    def _samples(
        c: Connection, model: str, canary: str, since: datetime | None
    ) -> list[tuple[int, str, str, bytes]]:
        t = samples_table.c
        q = select(t.id, t.replica, t.side, t.data).where(t.model == model, t.canary == canary)
        if since is not None:
            q = q.where(t.created_at >= since - timedelta(seconds=REREAD_S))
        return [(i, r, s, d) for i, r, s, d in c.execute(q.order_by(t.id))]

    def publish(self, model: str, revision: int, state: str) -> int | None:
        """Write `state` over `revision`: the new revision, or None when another replica wrote
        first (this replica then adopts theirs)."""
        with self.engine.begin() as c:
            new: int | None = c.scalar(
                update(releases_table)
                .where(releases_table.c.model == model, releases_table.c.revision == revision)
                .values(revision=releases_table.c.revision + 1, state=state, updated_by=self.replica_id)
                .returning(releases_table.c.revision)
            )
        return new

    def forget(
        self,
        model: str,
        running: str | None,
        horizon: float | None,
        alerts_horizon: float,
        shadow: str | None = None,
    ) -> None:
        """Drop the rows of `model`'s ended canaries, experiments and shadows, and the running
        one's older than `horizon` (a canary's gates read a window; an experiment reads all its
        counts, so its horizon is None), its monitoring rows older than `alerts_horizon`, and
        of the running shadow all but each mirror's latest row (which holds all of it): the
        deciding replica keeps the table to what a decision may still read."""
        t = samples_table.c
        old = and_(t.canary.not_in([running or "", ALERTS, shadow or ""]))
        if horizon is not None:
            old = or_(old, and_(t.canary == running, t.last_at < horizon))
        old = or_(old, and_(t.canary == ALERTS, t.last_at < alerts_horizon))
        if shadow is not None:
            latest = (
                select(func.max(t.id))
                .where(t.model == model, t.canary == shadow)
                .group_by(t.side)
                .scalar_subquery()
            )
            old = or_(old, and_(t.canary == shadow, t.id.not_in(latest)))
        with self.engine.begin() as c:
            c.execute(delete(samples_table).where(t.model == model, old))

    def close(self) -> None:
        """Hand this replica's models back at once and leave (a graceful stop)."""
        try:
            with self.engine.begin() as c:
                c.execute(
                    update(releases_table)
                    .where(releases_table.c.owner == self.replica_id)
                    .values(owner=None, lease_until=None)
                )
                c.execute(
                    delete(replicas_table).where(
                        replicas_table.c.replica_id == self.replica_id, replicas_table.c.nonce == self.nonce
                    )
                )
        except SQLAlchemyError as exc:
            log.warning("gateway replica %s: leaving the store failed: %s", self.replica_id, exc)
        self.engine.dispose()


# ---- the gateway's side -----------------------------------------------------------------------


class Replication(GatewayCore):
    """What a gateway does with a `ReleaseStore` each tick: send its samples, adopt the stored
    state, decide for the models it leads (on every replica's samples), write what changed."""

    replicas: ReleaseStore | None
    if TYPE_CHECKING:  # in the release operations

        def tick(self) -> list[tuple[str, str, Path | None]]: ...

        def _mirror(
            self,
            st: ModelState,
            version: str,
            share: float,
            budget: ShadowBudget,
            queue_max: int,
            shadow_id: str | None = None,
        ) -> ShadowMirror: ...

    def _init_replication(self) -> None:
        cfg = self.config.gateway.replication
        self.replicas = ReleaseStore(cfg) if cfg is not None else None
        self._revisions: dict[
            str, tuple[int, str]
        ] = {}  # model → (revision, `settled` state) adopted or written
        self._led: set[str] = set()
        self._combined: dict[str, Combined] = {}
        self._arms: dict[str, CombinedArms] = {}
        self._monitored: dict[str, CombinedAlerts] = {}  # model → every replica's monitoring rows
        self._shadows: dict[str, CombinedShadow] = {}  # model → every replica's mirror of its shadow
        self._shadow_sent: dict[str, int] = {}  # mirror id → comparisons in its last row sent
        self._unsent: list[Outgoing] = []
        self.unsent_dropped = 0  # rows of samples lost to an outage longer than UNSENT_MAX ticks
        self._seq = 0
        self._behind: dict[str, str] = {}  # model → why its stored state is not adopted here
        self._synced_at = -math.inf
        self._fresh = False  # this tick's exchange succeeded: decisions may be taken
        self._ticks = 0
        self.replication_error: str | None = None
        self._replica_lock = asyncio.Lock()

    async def _open_replication(self) -> None:
        assert self.replicas is not None
        initial = {n: encode(routing_state(st)) for n, st in self.models.items()}
        await asyncio.to_thread(self.replicas.open, initial)
        async with self._replica_lock:
            if not await self._pull():
                raise ReplicationError(f"the gateways' shared store: {self.replication_error}")
        log.info(
            "gateway replica %s on %s: leads %s",
            self.replicas.replica_id,
            self.replicas.describe(),
            sorted(self._led) or "nothing yet",
        )

    async def _close_replication(self) -> None:
        if self.replicas is not None:
            await asyncio.to_thread(self.replicas.close)

    def _drain(self) -> None:
        for name, st in self.models.items():
            if (watched := self._monitoring_row(st)) is not None:
                self._seq = max(self._seq + 1, time.time_ns() // 1000)
                data = encode(watched).encode()
                self._unsent.append(Outgoing(name, ALERTS, self._seq, "alerts", watched["at"], data))
            if (e := st.experiment) is not None and (deltas := e.drain()):
                self._seq = max(self._seq + 1, time.time_ns() // 1000)
                data = json.dumps(deltas).encode()
                self._unsent.append(Outgoing(name, e.id, self._seq, "experiment", time.time(), data))
            sh = st.shadow
            if (
                sh is not None
                and sh.active
                and sh.state is not None
                and self._shadow_sent.get(sh.mirror_id) != (n := _compared(sh.state))
            ):
                self._shadow_sent[sh.mirror_id] = n
                self._seq = max(self._seq + 1, time.time_ns() // 1000)
                data = json.dumps(sh.state).encode()
                side = SHADOW_SIDE + sh.mirror_id
                self._unsent.append(Outgoing(name, sh.id, self._seq, side, time.time(), data))
            c = st.canary
            if c is None:
                continue
            self._seq = max(self._seq + 1, time.time_ns() // 1000)
            for side, rec in c.sides.items():
                arrays = rec.drain()
                if arrays:
                    last = max(float(at[-1]) for at, _ in arrays.values())
                    self._unsent.append(Outgoing(name, c.id, self._seq, side, last, pack(arrays)))

    @staticmethod
    def _monitoring_row(st: ModelState) -> dict[str, Any] | None:
        """What this replica's monitoring saw of `st` since the last row (then forgotten here:
        the leader counts it), or None when there is nothing to send."""
        counts = {v: c for v, c in st.counts.items() if any(c)}
        inputs = {v: c for v, c in st.inputs.items() if any(c)}
        labels, paths = list(st.labels), list(st.paths)
        st.counts.clear()
        st.inputs.clear()
        st.labels.clear()
        st.paths.clear()
        if not (st.rules or st.canary is not None):  # no alert rule nor canary reads them
            return None
        if not (counts or inputs or labels or paths):
            return None
        return {"at": time.time(), "counts": counts, "inputs": inputs, "labels": labels, "paths": paths}

    async def _pull(self) -> bool:
        """One exchange with the store; False (and the reason kept) when it could not be had."""
        assert self.replicas is not None
        self._drain()
        reads: dict[tuple[str, str], datetime | None] = {}
        everyone: set[tuple[str, str]] = set()
        for name, st in self.models.items():
            watched = self._monitored.get(name)
            reads[(name, ALERTS)] = watched.read_until if watched is not None else None
            if (sh := st.shadow) is not None and sh.active:  # every replica's verdict is on all
                mirrors = self._shadows.get(name)
                since = mirrors.read_until if mirrors is not None and mirrors.id == sh.id else None
                reads[(name, sh.id)] = since
                everyone.add((name, sh.id))
            if st.canary is not None:
                comb = self._combined.get(name)
                since = comb.read_until if comb is not None and comb.id == st.canary.id else None
                reads[(name, st.canary.id)] = since
            elif st.experiment is not None:
                arms = self._arms.get(name)
                since = arms.read_until if arms is not None and arms.id == st.experiment.id else None
                reads[(name, st.experiment.id)] = since
                if st.experiment.bandit is not None:
                    everyone.add((name, st.experiment.id))
        try:
            pulled = await asyncio.to_thread(
                self.replicas.exchange, list(self._unsent), reads, list(self.models), frozenset(everyone)
            )
        except (SQLAlchemyError, ReplicationError) as exc:
            if self.replication_error != brief(exc):
                log.warning("gateway replica %s: the shared store: %s", self.replicas.replica_id, brief(exc))
            self.replication_error = brief(exc)
            if len(self._unsent) > UNSENT_MAX:  # a long outage: keep the newest, count the rest
                self.unsent_dropped += len(self._unsent) - UNSENT_MAX
                del self._unsent[: len(self._unsent) - UNSENT_MAX]
            return False
        self._unsent.clear()
        now = self.clock()
        for name, (rev, raw) in pulled.rows.items():
            if name not in self.models or self._revisions.get(name, (None, ""))[0] == rev:
                continue  # a model this replica does not serve, or nothing new
            model = self.models[name]
            state = json.loads(raw)
            if missing := unloaded(model, state):
                self._behind[name] = f"revision {rev} routes to {', '.join(missing)}, not loaded here"
                continue
            self._behind.pop(name, None)
            adopt(model, state, now)
            self._follow_shadow(model, state.get("shadow"))
            self._revisions[name] = (rev, settled(routing_state(model)))
        self._led = pulled.led
        for name in [n for n in self._combined if n not in self._led]:
            del self._combined[name]  # leading again later, it reads everything afresh
        for name in [n for n in self._arms if n not in self._led and (n, self._arms[n].id) not in everyone]:
            del self._arms[name]
        for name in [n for n in self._monitored if n not in self._led]:
            del self._monitored[name]
            self._unwatch(self.models[name])
        for (name, rid), rows in pulled.samples.items():
            st = self.models[name]
            if (sh := st.shadow) is not None and sh.id == rid:
                if (mirrors := self._shadows.get(name)) is None or mirrors.id != rid:
                    mirrors = self._shadows[name] = CombinedShadow(rid)
                mirrors.take(rows, pulled.read_at)
                sh.set_peers(mirrors.latest)
            elif rid == ALERTS:
                self._monitored.setdefault(name, CombinedAlerts(ALERTS)).take(rows, pulled.read_at)
            elif st.canary is not None and st.canary.id == rid:
                if (comb := self._combined.get(name)) is None or comb.id != rid:
                    comb = self._combined[name] = Combined(rid)
                comb.take(rows, pulled.read_at)
            elif st.experiment is not None and st.experiment.id == rid:
                if (arms := self._arms.get(name)) is None or arms.id != rid:
                    arms = self._arms[name] = CombinedArms(rid)
                arms.take(rows, pulled.read_at)
                if st.experiment.bandit is not None:  # every replica draws on every reward
                    st.experiment.bandit.adopt(arms.arms)
        self._synced_at = time.monotonic()
        self.replication_error = None
        return True

    def _follow_shadow(self, st: ModelState, want: dict[str, Any] | None) -> None:
        """Run a mirror of the stored shadow here, or stop this replica's when the shadow has
        ended (on another replica: its verdict came with the state)."""
        sh = st.shadow
        if want is None:
            if sh is not None and sh.active:
                sh.stopped_reason, sh.noted = "ended on another gateway replica", True
                self._background(sh.stop())
            return
        if sh is not None and sh.id == want["id"]:
            return  # running here, or stopped here since the last tick (published after it)
        try:
            mirror = self._mirror(
                st,
                want["version"],
                float(want["share"]),
                budget_from_dict(want["budget"]),
                int(want["queue_max"]),
                shadow_id=want["id"],
            )
        except Exception as exc:  # a budget this version cannot judge: say so, route on
            self._behind[st.name] = f"its shadow of {want['version']} cannot run here: {brief(exc)}"
            return
        if sh is not None:
            self._background(sh.stop())
        st.shadow = mirror
        mirror.start()
        log.info("gateway replica: mirroring %s of %s to %s", f"{mirror.share:.0%}", st.name, mirror.version)

    def _shadow_decide(self, st: ModelState) -> None:
        """Among replicas the leading one alone ends a shadow whose verdict fails, and only on
        a good exchange (the verdict is then on every replica's comparisons)."""
        sh = st.shadow
        if self.replicas is None or sh is None or not sh.active:
            return
        if self._fresh and st.name in self._led and sh.verdict.verdict == "fail":
            sh.stopped_reason = (
                f"{sh.verdict.reason} (on {sh.stats.summary.get('mirrors', 1)} replicas' mirrors)"
            )

    def _judge(self, st: ModelState, now: datetime) -> Decision | None:
        """The canary's decision this tick: its own on a single gateway; among replicas only
        the leading one decides, on every replica's samples, and only after a good exchange."""
        assert st.canary is not None
        if self.replicas is None:
            return st.canary.tick(now)
        comb = self._combined.get(st.name)
        if not self._fresh or st.name not in self._led or comb is None or comb.id != st.canary.id:
            return None
        judge = replace(st.canary, sides=comb.sides(now.timestamp() - 2 * st.canary.spec.window_s))
        before = len(st.canary.log)
        decision = judge.tick(now)  # its log is the canary's own list
        st.canary.state, st.canary.last_reason = judge.state, judge.last_reason
        if len(st.canary.log) > before:
            n = judge.sides["candidate"].seen
            st.canary.log[-1] += f" [{n} candidate requests from replicas {', '.join(sorted(comb.replicas))}]"
        return decision

    def _analyse(self, st: ModelState) -> str | None:
        """The experiment's verdict this tick: its own on a single gateway; among replicas only
        the leading one's, on every replica's counts (they stay on the experiment once it
        ends, so its summary shows them)."""
        exp = st.experiment
        assert exp is not None
        if self.replicas is None:
            return exp.analyse()
        arms = self._arms.get(st.name)
        if not self._fresh or st.name not in self._led or arms is None or arms.id != exp.id:
            return None
        local = exp.arms
        exp.arms = {arm: replace(arms.arms.get(arm, ArmStats())) for arm in local}
        verdict = exp.analyse()
        if verdict is None:
            exp.arms = local
        else:
            self._note(st, f"experiment decided on the counts of replicas {', '.join(sorted(arms.replicas))}")
        return verdict

    @staticmethod
    def _unwatch(st: ModelState) -> None:
        """No longer leading `st`: forget what its alert rules had read, so that leading again
        it reads every replica's stored rows afresh instead of counting them twice. The rules'
        states stay: they are the stored ones (`adopt`), which a leader goes on from."""
        st.outcomes.clear()
        st.values.clear()

    def _alert_feed(
        self, st: ModelState, now: datetime
    ) -> tuple[dict[str, Calibration], dict[str, list[int]]] | None:
        """Before the alert rules of `st` run: the calibration and this tick's input counts they
        read, with this tick's outcomes added to `st.outcomes`; None when this replica must not
        judge them (among replicas: it does not lead `st`, or this tick's exchange failed). On a
        single gateway, its own counts; among replicas, every replica's rows (this one's local
        counts stay where they are, for its next row)."""
        if self.replicas is None:
            for version, (good, bad) in st.counts.items():
                if good or bad:
                    st.outcomes.setdefault(version, deque(maxlen=4096)).append(CountSample(now, good, bad))
            st.counts.clear()
            return st.calibration, st.inputs
        watched = self._monitored.get(st.name)
        if not self._fresh or st.name not in self._led or watched is None:
            return None
        inputs: dict[str, list[int]] = {}
        for r in watched.pop():
            at = datetime.fromtimestamp(float(r["at"]), tz=now.tzinfo)
            for version, (good, bad) in r["counts"].items():
                st.outcomes.setdefault(version, deque(maxlen=4096)).append(CountSample(at, good, bad))
            for version, (seen, unusual) in r["inputs"].items():
                c = inputs.setdefault(version, [0, 0])
                c[0], c[1] = c[0] + seen, c[1] + unusual
            if (canary := st.canary) is not None:
                comb = self._combined.get(st.name)
                for _, version, ade, fde, t in r.get("paths", []):
                    if (
                        comb is not None
                        and comb.id == canary.id
                        and version in (canary.candidate, canary.production)
                    ):
                        side = "candidate" if version == canary.candidate else "baseline"
                        for m, value in (("ade", ade), ("fde", fde)):
                            comb.parts[side][m].append((np.array([float(t)]), np.array([float(value)])))
                for _, version, confidence, correct, t in r["labels"]:
                    if version in (canary.candidate, canary.production):
                        side = "candidate" if version == canary.candidate else "baseline"
                        canary.labels[side].append((float(t), float(confidence), bool(correct)))
                        if comb is not None and comb.id == canary.id:
                            comb.parts[side]["correct"].append(
                                (np.array([float(t)]), np.array([1.0 if correct else 0.0]))
                            )
        return watched.calibration, inputs

    async def _publish(self) -> list[str]:
        """Write each model whose state changed here over the revision it had; the models
        whose write lost (they adopt the stored state on the next exchange)."""
        assert self.replicas is not None
        lost = []
        for name, st in self.models.items():
            if name in self._behind:
                continue
            state = routing_state(st)
            rev, known = self._revisions.get(name, (0, ""))
            if (key := settled(state)) == known:
                continue
            raw = encode(state)
            try:
                new = await asyncio.to_thread(self.replicas.publish, name, rev, raw)
            except SQLAlchemyError as exc:
                self.replication_error = brief(exc)
                new = None
            if new is None:
                lost.append(name)
                self._revisions[name] = (-1, "")
            else:
                self._revisions[name] = (new, key)
        return lost

    async def _replicated_tick(self) -> None:
        async with self._replica_lock:
            self._fresh = await self._pull()
            try:
                self.tick()
            finally:
                self._fresh = False
            await self._publish()
            self._ticks += 1
            if self._ticks % 30 == 0:
                await self._forget()

    async def _forget(self) -> None:
        assert self.replicas is not None
        now = self.clock().timestamp()
        for name in self._led:
            st = self.models[name]
            running: str | None
            horizon: float | None
            if (c := st.canary) is not None:
                running, horizon = c.id, now - 2 * c.spec.window_s
            else:
                running, horizon = (st.experiment.id if st.experiment else None), None
            shadow = st.shadow.id if st.shadow is not None and st.shadow.active else None
            with contextlib.suppress(SQLAlchemyError):
                keep = max([ALERTS_KEEP_S, *(2 * a.window_s for a in st.config.alerts)])
                await asyncio.to_thread(self.replicas.forget, name, running, horizon, now - keep, shadow)

    @contextlib.asynccontextmanager
    async def replicated(self) -> AsyncIterator[None]:
        """Around an operator's change: start from the stored state, and store the result (409
        when another replica changed the model at the same moment)."""
        if self.replicas is None:
            yield
            return
        async with self._replica_lock:
            if not await self._pull():
                raise ReplicationError(
                    f"the gateways' shared store cannot be reached: {self.replication_error}"
                )
            yield
            if lost := await self._publish():
                await self._pull()
                raise ReleaseError(
                    f"another gateway replica changed {', '.join(lost)} at the same moment (or the store "
                    "failed): this replica now shows the stored state; look and try again"
                )

    def replication_status(self, name: str) -> dict[str, Any] | None:
        if self.replicas is None:
            return None
        return {
            "replica": self.replicas.replica_id,
            "leading": name in self._led,
            "revision": self._revisions.get(name, (None, ""))[0],
            "behind": self._behind.get(name),
            "error": self.replication_error,
            "unsent_dropped": self.unsent_dropped,
        }

    def replication_unready(self) -> list[str]:
        """Why this replica must not take traffic: its store is out of reach for longer than a
        lease, or a stored state routes to versions it has not loaded."""
        if self.replicas is None:
            return []
        why = [f"{name}: {reason}" for name, reason in sorted(self._behind.items())]
        if time.monotonic() - self._synced_at > self.replicas.cfg.lease_s:
            why.append(
                f"the shared store was not reached within {self.replicas.cfg.lease_s:g} s: "
                f"{self.replication_error or 'not yet'}"
            )
        return why
