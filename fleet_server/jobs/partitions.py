"""Fleet-server replicas share the device traffic by partition, not by shared subscription.

Mosquitto 2.0.11 (Debian's, the broker the tests run) delivers no ``$aws/...`` message to a
``$share/...`` subscription (docs/SCALING.md), so every replica subscribes to every thing's
topics and hears every message; each handles only the things in the partitions it holds
(``crc32(thing) % PARTITIONS``) and acknowledges the rest unhandled. Works on any MQTT
broker; on one with working shared subscriptions it costs each replica the parsing of the
messages it drops.

Ownership lives in PostgreSQL, on the database's clock (``now()``), never a replica's:

- a replica heartbeats (`fleet_replicas`) and renews the leases of the partitions it holds
  every `heartbeat_s`; the live replicas (heartbeat younger than `stale_s`) share the
  partitions evenly (`balance`): one over its share releases the surplus, one under it
  claims partitions that are free (released more than `grace_s` ago, or never held) or whose
  lease ran out (their replica died) with ``FOR UPDATE SKIP LOCKED``;
- a batch of messages takes ``FOR KEY SHARE`` on its partitions' rows in its own transaction
  and handles only those still owned by this replica. Renewing and releasing are plain
  UPDATEs of non-key columns, which do not wait for a batch; claiming takes ``FOR UPDATE``,
  which conflicts with the batch's lock, so a partition never changes hands while a batch of
  its messages is being handled;
- a replica handles a message only if it arrived after the claim of its partition
  committed: the previous owner (which heard the same message) may already have handled one
  that arrived earlier. `grace_s` between a release and the next claim covers the skew
  between two replicas' copies of one message.

A message that falls between two owners (the old one killed before committing it) is
recovered the way AWS IoT Jobs devices recover any lost reply: the device asks again (the
agent re-sends on timeout and polls start-next; the sweeper re-notifies queued executions).

SQLite serves one replica (`fleet_server.server.claim_sqlite`): it holds every partition, with
no table access at all.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Collection
from datetime import timedelta
from typing import Any

from sqlalchemy import DateTime, and_, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from fleet_server.db import Database
from fleet_server.jobs.models import FleetReplica, JobsPartition
from shared.errors import TidegateError

log = logging.getLogger("tidegate.server.partitions")
PARTITIONS = 64  # the migration 0011 made this many rows


class DuplicateReplicaError(TidegateError):
    """Another live replica uses this MQTT client id: the broker would close one of the two
    connections whenever the other connects, and both would claim the same partitions."""


def partition_of(thing: str) -> int:
    return zlib.crc32(thing.encode()) % PARTITIONS


def balance(held: Collection[int], live: int, partitions: int = PARTITIONS) -> tuple[list[int], int]:
    """What a replica holding `held` does when `live` replicas run: the partitions it releases
    (the highest, beyond its share) and how many more it may claim (up to its share). The share
    is rounded up, so the shares always cover every partition."""
    share = math.ceil(partitions / max(1, live))
    ordered = sorted(held)
    return ordered[share:], max(0, share - len(ordered))


def _db_now() -> Any:
    """The database's clock in UTC, as the naive timestamps the columns store."""
    return func.timezone("utc", func.now(), type_=DateTime())


class PartitionLeases:
    """One replica's partitions: registration, heartbeat, renewal and rebalancing on a thread,
    and the check a batch makes before it handles messages (`holding`)."""

    def __init__(
        self,
        db: Database,
        replica_id: str,
        *,
        heartbeat_s: float = 1.0,
        lease_s: float = 5.0,
        stale_s: float = 5.0,
        grace_s: float = 2.0,
    ) -> None:
        self.db, self.replica_id = db, replica_id
        self.heartbeat_s, self.lease_s, self.stale_s, self.grace_s = heartbeat_s, lease_s, stale_s, grace_s
        self.nonce = uuid.uuid4().hex
        self.owner = f"{replica_id}/{self.nonce[:12]}"
        self.shared = db.engine.dialect.name == "postgresql"
        # partition → time.monotonic() when this replica's claim of it had committed
        self._held: dict[int, float] = {} if self.shared else dict.fromkeys(range(PARTITIONS), -math.inf)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="jobs-partitions", daemon=True)
        self.last_ok = time.monotonic()
        self.live_replicas = 1
        # What this replica writes in its heartbeat, and the highest of the live replicas'
        # (None until a heartbeat read it, and on SQLite's one replica).
        self.load: Callable[[], float] = lambda: 0.0
        self.fleet_load: float | None = None
        self.claims = 0
        self.releases = 0

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self, *, wait_s: float | None = None) -> None:
        """Register (waiting out a stale heartbeat of this id, as after a SIGKILL and restart),
        take a first share, and keep it on a thread. Raises DuplicateReplicaError if another live
        replica keeps this id for longer than `wait_s` (default: twice `stale_s`)."""
        if not self.shared:
            return
        deadline = time.monotonic() + (wait_s if wait_s is not None else 2 * self.stale_s)
        while not self._register():
            if time.monotonic() > deadline:
                raise DuplicateReplicaError(
                    f"another fleet-server replica with the MQTT client id {self.replica_id!r} is live "
                    f"(its heartbeat is younger than {self.stale_s:g} s): give each replica its own "
                    "TIDEGATE_MQTT_CLIENT_ID"
                )
            time.sleep(min(0.5, self.stale_s / 4))
        self.step()
        self._thread.start()

    def stop(self) -> None:
        """Hand every partition back at once (the others claim them after `grace_s`) and
        remove the heartbeat, so the live count drops without waiting `stale_s`."""
        if not self.shared:
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        try:
            with self.db.session() as s:
                s.execute(
                    update(JobsPartition)
                    .where(JobsPartition.owner == self.owner)
                    .values(owner=None, lease_until=None, released_at=_db_now())
                )
                s.execute(
                    delete(FleetReplica).where(
                        FleetReplica.replica_id == self.replica_id, FleetReplica.nonce == self.nonce
                    )
                )
        except Exception:
            log.exception("could not hand the jobs partitions back; they expire in %g s", self.lease_s)
        with self._lock:
            self._held.clear()

    def _register(self) -> bool:
        stale = _db_now() - timedelta(seconds=self.stale_s)
        with self.db.session() as s:
            stmt = pg_insert(FleetReplica).values(
                replica_id=self.replica_id, nonce=self.nonce, heartbeat_at=_db_now(), started_at=_db_now()
            )
            upsert = stmt.on_conflict_do_update(
                index_elements=[FleetReplica.replica_id],
                set_={"nonce": self.nonce, "heartbeat_at": _db_now(), "started_at": _db_now()},
                where=FleetReplica.heartbeat_at < stale,
            ).returning(FleetReplica.replica_id)
            return s.execute(upsert).first() is not None

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.step()
            except Exception:
                log.exception("jobs partitions: heartbeat failed (leases run out in %g s)", self.lease_s)

    # ---- one round ---------------------------------------------------------------------------------

    def step(self) -> None:
        """Heartbeat, renew, release the surplus or claim up to this replica's share: one
        transaction on the database's clock."""
        now = _db_now()
        with self.db.session() as s:
            beat = s.execute(
                update(FleetReplica)
                .where(FleetReplica.replica_id == self.replica_id, FleetReplica.nonce == self.nonce)
                .values(heartbeat_at=now, jobs_load=self.load())
                .returning(FleetReplica.replica_id)
            ).first()
            if beat is None:  # our id was taken over after we looked dead: hold nothing
                log.error("replica %s lost its registration; it handles no device traffic", self.replica_id)
                s.execute(
                    update(JobsPartition)
                    .where(JobsPartition.owner == self.owner)
                    .values(owner=None, lease_until=None, released_at=now)
                )
                renewed: set[int] = set()
                claimed: list[int] = []
                live, fleet_load = 0, None
            else:
                count, fleet_load = s.execute(
                    select(func.count(), func.max(FleetReplica.jobs_load)).where(
                        FleetReplica.heartbeat_at > now - timedelta(seconds=self.stale_s)
                    )
                ).one()
                live = count or 1
                renewed = set(
                    s.scalars(
                        update(JobsPartition)
                        .where(JobsPartition.owner == self.owner)
                        .values(lease_until=now + timedelta(seconds=self.lease_s))
                        .returning(JobsPartition.partition)
                    )
                )
                release, want = balance(renewed, live)
                if release:
                    s.execute(
                        update(JobsPartition)
                        .where(JobsPartition.partition.in_(release), JobsPartition.owner == self.owner)
                        .values(owner=None, lease_until=None, released_at=now)
                    )
                    renewed -= set(release)
                    self.releases += len(release)
                claimed = self._claim(s, want) if want else []
        committed = time.monotonic()
        with self._lock:
            kept = {p: t for p, t in self._held.items() if p in renewed}
            kept.update(dict.fromkeys(claimed, committed))
            self._held = kept
        self.claims += len(claimed)
        self.live_replicas = live
        self.fleet_load = fleet_load
        self.last_ok = committed
        if claimed:
            log.info("replica %s claimed partitions %s (holds %d)", self.replica_id, claimed, len(kept))

    def _claim(self, s: Session, want: int) -> list[int]:
        now = _db_now()
        free = or_(
            and_(
                JobsPartition.owner.is_(None),
                or_(
                    JobsPartition.released_at.is_(None),
                    JobsPartition.released_at < now - timedelta(seconds=self.grace_s),
                ),
            ),
            and_(JobsPartition.owner.is_not(None), JobsPartition.lease_until < now),
        )
        rows = list(
            s.scalars(
                select(JobsPartition.partition)
                .where(free)
                .order_by(JobsPartition.partition)
                .limit(want)
                .with_for_update(skip_locked=True)
            )
        )
        if rows:
            s.execute(
                update(JobsPartition)
                .where(JobsPartition.partition.in_(rows))
                .values(owner=self.owner, lease_until=now + timedelta(seconds=self.lease_s), released_at=None)
            )
        return rows

    # ---- what batches ask --------------------------------------------------------------------------

    def holds_locally(self, partition: int) -> bool:
        """This replica's last known view, for decisions taken outside a transaction (whether to
        answer a throttled request, whether to drop a message on receipt): never for handling a
        message, which `holding` decides in the batch's transaction."""
        return partition in self._held

    def holding(self, s: Session, partitions: Collection[int]) -> dict[int, float]:
        """Of `partitions`, those this replica holds, each with the monotonic time its claim
        committed, locked (``FOR KEY SHARE``) in `s`'s transaction so that no other replica can
        claim one before it ends."""
        with self._lock:
            local = dict(self._held)
        if not self.shared:
            return {p: local[p] for p in partitions}
        wanted = sorted(p for p in set(partitions) if p in local)
        if not wanted:
            return {}
        owned = s.scalars(
            select(JobsPartition.partition)
            .where(JobsPartition.partition.in_(wanted), JobsPartition.owner == self.owner)
            .with_for_update(key_share=True, read=True)
        )
        return {p: local[p] for p in owned}

    @property
    def held(self) -> int:
        return len(self._held)

    def healthy(self) -> bool:
        """Whether the leases were renewed recently enough to still be this replica's."""
        return not self.shared or time.monotonic() - self.last_ok < self.lease_s
