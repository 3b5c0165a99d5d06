"""/api/v1/releases (registry, bench reports) and /repo (the update repository, with Range)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from fleet_server.auth.deps import Principal, require
from fleet_server.auth.service import Role, audit
from fleet_server.paging import known_filters
from fleet_server.releases import service
from fleet_server.releases.models import BenchReport, Release
from shared.errors import TidegateError
from shared.trust import UpdateRepository
from shared.trust.http import parse_range, resolve_repo_path

router = APIRouter(tags=["releases"])
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
MAX_UPLOAD = 8 << 30
ReleaseId = Annotated[int, PathParam(ge=1, le=2**31 - 1)]


class ReleasePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    version: str
    target: str
    sha256: str
    length: int
    skus: list[str]
    runtime: str
    stage: str
    lineage: dict[str, Any]
    model_card: list[dict[str, Any]]
    created_at: datetime
    created_by: str


class StageBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: service.Stage


class CardBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    section: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_-]+$")
    content: dict[str, Any]


class BenchBody(BaseModel):
    """A bench report as `tidegate hil run` wrote and signed it (report.json's content)."""

    model_config = ConfigDict(extra="forbid")
    report: dict[str, Any]


class BenchPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    sku: str
    passed: bool
    summary: dict[str, Any]
    uploaded_at: datetime
    uploaded_by: str


def _repo(request: Request) -> UpdateRepository:
    repo: UpdateRepository | None = request.app.state.repository
    if repo is None:
        raise HTTPException(503, "this server has no update repository configured (TIDEGATE_REPOSITORY_DIR)")
    return repo


@router.get(
    "/api/v1/releases",
    response_model=list[ReleasePublic],
    dependencies=[known_filters("name", "version", "stage", "sku", "before_id", "limit")],
)
def list_releases(
    request: Request,
    who: Viewer,
    name: Annotated[str | None, Query(max_length=64)] = None,
    version: Annotated[str | None, Query(max_length=64)] = None,
    stage: Annotated[str | None, Query(max_length=32)] = None,
    sku: Annotated[str | None, Query(max_length=64, description="releases built for this SKU")] = None,
    before_id: Annotated[
        int | None, Query(ge=1, le=2**31 - 1, description="cursor: older than this id")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[Release]:
    """Releases, newest first, filtered; page with `before_id` (the last id seen)."""
    with request.app.state.db.session() as s:
        q = select(Release).order_by(Release.id.desc())
        for column, value in ((Release.name, name), (Release.version, version), (Release.stage, stage)):
            if value is not None:
                q = q.where(column == value)
        if before_id is not None:
            q = q.where(Release.id < before_id)
        if sku is None:
            return list(s.scalars(q.limit(limit)).all())
        # SKUs live in a JSON list: filtered here, in pages, so `limit` still means matches.
        out: list[Release] = []
        for r in s.scalars(q):
            if sku in (r.skus or []):
                out.append(r)
                if len(out) >= limit:
                    break
        return out


@router.post(
    "/api/v1/releases",
    response_model=ReleasePublic,
    status_code=201,
    responses={
        202: {"description": "staged: the target's role needs a signature this server does not hold"},
        422: {"description": "the bundle is refused; the reason is named"},
    },
    openapi_extra={
        "requestBody": {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "required": True,
        }
    },
)
async def publish(request: Request, who: Operator) -> Release | JSONResponse:
    """Upload a bundle (raw body): it is verified, signed into the repository and registered."""
    repo = _repo(request)
    fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".bundle", dir=repo.dir)
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_UPLOAD:
                    raise HTTPException(413, f"bundle above {MAX_UPLOAD} bytes")
                fh.write(chunk)
        if size == 0:
            raise HTTPException(422, "empty body: send the bundle file as application/octet-stream")
        now = request.app.state.clock()

        def publish_and_record() -> Release | JSONResponse:
            with request.app.state.db.session() as s:
                release, published = service.publish(s, repo=repo, bundle=Path(tmp), actor=who.name, now=now)
                audit(
                    s,
                    actor=who.name,
                    role=who.role.value,
                    action="release.publish" if release is not None else "release.stage",
                    target=published.path,
                    outcome="ok",
                    now=now,
                )
                s.flush()
                if release is None:
                    return JSONResponse(
                        status_code=202,
                        content={
                            "staged": True,
                            "target": published.path,
                            "role": published.role,
                            "waiting": [p.describe() for p in published.pending],
                        },
                    )
                return release

        try:
            # Signing and hashing a bundle takes seconds: off the event loop, so the API, the
            # dashboard and /repo keep answering while it runs (the repository lock orders writers).
            return await run_in_threadpool(publish_and_record)
        except TidegateError as exc:
            raise HTTPException(422, f"bundle refused: {exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def _release_action(
    request: Request,
    who: Principal,
    action: str,
    release_id: ReleaseId,
    fn: Callable[[Session, datetime], Release],
) -> Release:
    now = request.app.state.clock()
    try:
        with request.app.state.db.session() as s:
            result: Release = fn(s, now)
            audit(
                s,
                actor=who.name,
                role=who.role.value,
                action=action,
                target=str(release_id),
                outcome="ok",
                now=now,
            )
            s.flush()
            return result
    except service.ReleaseNotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
    except service.ReleaseError as exc:
        raise HTTPException(409, str(exc)) from exc


@router.post("/api/v1/releases/{release_id}/stage", response_model=ReleasePublic)
def set_stage(request: Request, release_id: ReleaseId, body: StageBody, who: Admin) -> Release:
    return _release_action(
        request,
        who,
        "release.stage",
        release_id,
        lambda s, now: service.set_stage(s, release_id=release_id, stage=body.stage, actor=who.name, now=now),
    )


@router.post("/api/v1/releases/{release_id}/model-card", response_model=ReleasePublic)
def add_card(request: Request, release_id: ReleaseId, body: CardBody, who: Operator) -> Release:
    return _release_action(
        request,
        who,
        "release.model_card",
        release_id,
        lambda s, now: service.append_card(
            s, release_id=release_id, section=body.section, content=body.content, actor=who.name, now=now
        ),
    )


@router.post(
    "/api/v1/releases/{release_id}/bench-reports",
    response_model=BenchPublic,
    status_code=201,
    responses={409: {"description": "the report cannot gate a campaign; every reason is named"}},
)
def add_bench(request: Request, release_id: ReleaseId, body: BenchBody, who: Operator) -> BenchReport:
    """Accepted only when the report is signed by a bench key this server knows, benched this
    release's bundle (SHA-256) for one of its SKUs on a rig whose pre-flight passed, ran to
    the end, and every required suite passed (install included; thermal on real zones unless
    the SKU is allowed a simulated one)."""
    now = request.app.state.clock()
    try:
        with request.app.state.db.session() as s:
            report = service.add_bench_report(
                s,
                release_id=release_id,
                report=body.report,
                keys=request.app.state.bench_keys,
                simulated_thermal_skus=request.app.state.bench_simulated_thermal_skus,
                actor=who.name,
                now=now,
            )
            audit(
                s,
                actor=who.name,
                role=who.role.value,
                action="release.bench_report",
                target=str(release_id),
                outcome="accepted",
                now=now,
            )
            s.flush()
            return report
    except service.ReleaseNotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
    except service.BenchRejectedError as exc:
        with request.app.state.db.session() as s:
            audit(
                s,
                actor=who.name,
                role=who.role.value,
                action="release.bench_report",
                target=str(release_id),
                outcome="refused: " + "; ".join(exc.reasons)[:400],
                now=now,
            )
        raise HTTPException(409, {"message": str(exc), "reasons": exc.reasons}) from exc
    except service.ReleaseError as exc:
        raise HTTPException(422, str(exc)) from exc


@router.get("/api/v1/releases/{release_id}/bench-reports")
def list_bench_reports(request: Request, release_id: ReleaseId, who: Viewer) -> list[dict[str, Any]]:
    """The bench reports uploaded for a release: SKU, verdict, summary, who and when."""
    with request.app.state.db.session() as s:
        service.get(s, release_id)  # a 404 for an unknown release
        q = select(BenchReport).where(BenchReport.release_id == release_id).order_by(BenchReport.id)
        fields = ("id", "sku", "passed", "summary", "uploaded_at", "uploaded_by")
        return [{f: getattr(r, f) for f in fields} for r in s.scalars(q)]


@router.get("/repo/{path:path}", include_in_schema=False)
def repository_file(request: Request, path: str) -> Response:
    """The update repository for devices: metadata/ and targets/ only, single ranges supported."""
    repo = _repo(request)
    file = resolve_repo_path(repo.dir, "/" + path)
    if file is None:
        raise HTTPException(404, "not found")
    size = file.stat().st_size
    header = request.headers.get("range")
    rng = parse_range(header, size) if size else (0, -1)
    if rng is None:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    start, end = rng

    def body() -> Iterator[bytes]:
        with file.open("rb") as fh:
            fh.seek(start)
            left = end - start + 1
            while left > 0 and (chunk := fh.read(min(1 << 20, left))):
                left -= len(chunk)
                yield chunk

    headers = {"Accept-Ranges": "bytes", "Content-Length": str(max(0, end - start + 1))}
    if header:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(
        body(), status_code=206 if header else 200, headers=headers, media_type="application/octet-stream"
    )
