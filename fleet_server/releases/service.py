"""Publishing releases into the update repository, the registry's stages and model cards, and
the bench (HIL) gate that campaigns must pass before they start."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.errors import FleetError, NotFoundError
from fleet_server.releases.models import BenchReport, Release
from fleet_server.webhooks import service as webhooks
from shared.benchreport import BenchKeyError, acceptance, parse_public
from shared.bundle import read_manifest
from shared.trust import PublishedTarget, UpdateRepository


class Stage(StrEnum):
    CANDIDATE = "candidate"
    STAGING = "staging"
    PRODUCTION = "production"
    RETIRED = "retired"


NEXT_STAGES = {
    Stage.CANDIDATE: {Stage.STAGING, Stage.RETIRED},
    Stage.STAGING: {Stage.PRODUCTION, Stage.CANDIDATE, Stage.RETIRED},
    Stage.PRODUCTION: {Stage.RETIRED},
    Stage.RETIRED: set(),
}


class ReleaseError(FleetError):
    pass


class ReleaseNotFoundError(ReleaseError, NotFoundError):
    http_status = NotFoundError.http_status


def publish(
    session: Session,
    *,
    repo: UpdateRepository,
    bundle: Path,
    actor: str,
    now: datetime,
    lineage: dict[str, Any] | None = None,
) -> tuple[Release | None, PublishedTarget]:
    """Verify and sign the bundle into the repository (immutable per path) and record it.

    A target whose delegated role needs a signature this server does not hold (a production
    role's approver) is staged, not published, and not recorded: devices could not fetch it.
    Posting the same bundle again once it is signed (`tidegate repo import`) records it."""
    published = repo.add_bundle(bundle)
    if published.pending:
        return None, published
    manifest = read_manifest(bundle)
    existing = session.scalars(select(Release).where(Release.target == published.path)).first()
    if existing is not None:
        return existing, published
    release = Release(
        name=manifest.name,
        version=manifest.version,
        target=published.path,
        sha256=published.sha256,
        length=published.length,
        skus=list(manifest.skus),
        runtime=manifest.runtime.value,
        stage=Stage.CANDIDATE.value,
        lineage={**manifest.provenance.lineage, **(lineage or {})},
        model_card=[],
        created_at=now,
        created_by=actor,
    )
    session.add(release)
    session.flush()
    return release, published


def get(session: Session, release_id: int) -> Release:
    r = session.get(Release, release_id)
    if r is None:
        raise ReleaseNotFoundError(f"no release {release_id}")
    return r


def by_target(session: Session, target: str) -> Release | None:
    return session.scalars(select(Release).where(Release.target == target)).first()


def set_stage(session: Session, *, release_id: int, stage: Stage, actor: str, now: datetime) -> Release:
    r = get(session, release_id)
    current = Stage(r.stage)
    if stage not in NEXT_STAGES[current]:
        raise ReleaseError(f"release {r.name} {r.version} is {current.value}; cannot move to {stage.value}")
    r.stage = stage.value
    data = {"release_id": r.id, "name": r.name, "version": r.version, "from": current.value}
    webhooks.emit(session, "release.staged", {**data, "to": stage.value, "actor": actor}, now)
    append_card(
        session,
        release_id=release_id,
        section="stage",
        content={"from": current.value, "to": stage.value},
        actor=actor,
        now=now,
    )
    return r


def append_card(
    session: Session, *, release_id: int, section: str, content: dict[str, Any], actor: str, now: datetime
) -> Release:
    """Model-card sections are appended, never edited: campaigns, canaries and benches add theirs."""
    r = get(session, release_id)
    r.model_card = [
        *r.model_card,
        {"section": section, "at": now.isoformat(), "by": actor, "content": content},
    ]
    return r


class BenchRejectedError(ReleaseError):
    """A bench report that cannot count as a passing run of the release: every reason named."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("the bench report cannot gate a campaign: " + "; ".join(reasons))
        self.reasons = reasons


def add_bench_report(
    session: Session,
    *,
    release_id: int,
    report: dict[str, Any],
    keys: Mapping[str, Ed25519PublicKey],
    simulated_thermal_skus: Collection[str],
    actor: str,
    now: datetime,
) -> BenchReport:
    """Accept a signed bench report only as evidence that this release's bundle passed every
    required suite on a rig that matched (`shared.benchreport.acceptance`): nothing is taken
    on the uploader's word. Anything less is a `BenchRejectedError` and nothing is stored."""
    r = get(session, release_id)
    sku = str(report.get("sku"))
    reasons = acceptance(
        report,
        release_sha256=r.sha256,
        release_skus=r.skus,
        keys=keys,
        simulated_thermal_ok=sku in simulated_thermal_skus,
    )
    if reasons:
        raise BenchRejectedError(reasons)
    summary = {
        **(report.get("summary") or {}),
        "bundle_sha256": report["bundle"]["sha256"],
        "rig": report.get("rig", {}),
        "signed_by": report["signature"]["keyid"],
        "started_at": report.get("started_at"),
    }
    bench = BenchReport(
        release_id=r.id, sku=sku, passed=True, summary=summary, uploaded_at=now, uploaded_by=actor
    )
    session.add(bench)
    append_card(
        session,
        release_id=r.id,
        section="bench",
        content={"sku": sku, "passed": True, **summary},
        actor=actor,
        now=now,
    )
    return bench


def bench_gate(session: Session, *, target: str, sku: str) -> str | None:
    """Why a campaign for `target` on `sku` may not start (None: the newest report for it passed)."""
    r = by_target(session, target)
    if r is None:
        return f"{target} is not a release in the registry"
    report = session.scalars(
        select(BenchReport)
        .where(BenchReport.release_id == r.id, BenchReport.sku == sku)
        .order_by(BenchReport.id.desc())
    ).first()
    if report is None:
        return f"no bench (HIL) report for {r.name} {r.version} on {sku}"
    if not report.passed:
        return f"the newest bench report for {r.name} {r.version} on {sku} failed"
    return None


def parse_bench_keys(keys: Mapping[str, str]) -> dict[str, Ed25519PublicKey]:
    """The bench hosts this server trusts, by name (settings: TIDEGATE_BENCH_KEYS)."""
    out = {}
    for name, text in keys.items():
        try:
            out[name] = parse_public(text)
        except BenchKeyError as exc:
            raise ReleaseError(f"bench key {name!r}: {exc}") from exc
    return out
