"""Releases and the registry: bundles uploaded, signed into the server's update repository and
served to devices (with Range) at /repo; stages, model cards, and the bench gate on campaigns."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet_server.app import create_app
from fleet_server.auth.service import Role, create_token
from fleet_server.db import Database
from fleet_server.migrate import upgrade
from shared.benchreport import public_text
from shared.trust import UpdateRepository
from tests.helpers import bench_report, build_bundle
from tests.mqtt_helpers import free_port

BENCH_KEY = Ed25519PrivateKey.generate()


@pytest.fixture
def served(tmp_path: Path, db: Database):  # type: ignore[no-untyped-def]
    repo = UpdateRepository.init(tmp_path / "repo")
    keys = {"bench-1": public_text(BENCH_KEY.public_key())}
    with db.session() as s:
        tokens = {r.value: create_token(s, name=f"{r.value}-1", role=r, now=datetime.now(UTC)) for r in Role}
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(db, repository=repo, bench_keys=keys), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", tokens, repo
    server.should_exit = True
    t.join(10)


def h(tokens: dict[str, str], role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens[role]}"}


def test_publish_serve_install_and_the_bench_gate(
    served: tuple[str, dict[str, str], UpdateRepository], tmp_path: Path, sample_payload: Path
) -> None:
    url, tokens, repo = served
    bundle = build_bundle(sample_payload, tmp_path / "c.bundle", version="2.0.0", skus=["edge-cpu"])
    r = httpx.post(url + "/api/v1/releases", content=bundle.read_bytes(), headers=h(tokens, "operator"))
    assert r.status_code == 201, r.text
    release = r.json()
    assert (release["name"], release["version"], release["stage"]) == ("classifier", "2.0.0", "candidate")
    assert (
        httpx.post(url + "/api/v1/releases", content=b"junk" * 100, headers=h(tokens, "operator")).status_code
        == 422
    )
    assert (
        httpx.post(
            url + "/api/v1/releases", content=bundle.read_bytes(), headers=h(tokens, "viewer")
        ).status_code
        == 403
    )

    # the repository, as devices see it
    assert httpx.get(url + "/repo/metadata/1.root.json").status_code == 200
    key = next(repo.keys_dir.rglob("*.pem")).relative_to(repo.dir)
    assert httpx.get(f"{url}/repo/{key}").status_code == 404
    target = f"/repo/targets/classifier/2.0.0/{release['sha256']}.edge-cpu.bundle"
    part = httpx.get(url + target, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == bundle.read_bytes()[100:200]
    from agent.device import DeviceConfig, DeviceRoot
    from agent.engine import Agent

    device = tmp_path / "device"
    DeviceRoot.provision(
        device,
        DeviceConfig(device_id="car-1", sku="edge-cpu"),
        (repo.metadata_dir / "1.root.json").read_bytes(),
    )
    report = Agent(device).install(repository=url + "/repo", target="classifier")
    assert report.ok, report.reason

    # registry: stages move only forward through staging; the model card is appended to
    rid = release["id"]
    r = httpx.post(
        f"{url}/api/v1/releases/{rid}/stage", json={"stage": "production"}, headers=h(tokens, "admin")
    )
    assert r.status_code == 409 and "candidate" in r.json()["detail"]
    for stage in ("staging", "production"):
        assert (
            httpx.post(
                f"{url}/api/v1/releases/{rid}/stage", json={"stage": stage}, headers=h(tokens, "admin")
            ).json()["stage"]
            == stage
        )

    # the bench gate
    spec = {
        "name": "c2",
        "target": release["target"],
        "repository": url + "/repo",
        "cohort": {"sku": "edge-cpu"},
        "waves": [{"percent": 100}],
    }
    cid = httpx.post(url + "/api/v1/campaigns", json=spec, headers=h(tokens, "operator")).json()["id"]
    httpx.post(f"{url}/api/v1/campaigns/{cid}/submit", headers=h(tokens, "operator")).raise_for_status()

    def approve() -> httpx.Response:
        return httpx.post(f"{url}/api/v1/campaigns/{cid}/approve", headers=h(tokens, "admin"))

    assert approve().status_code == 409 and "no bench (HIL) report" in approve().json()["detail"]

    def upload(report: dict[str, object]) -> httpx.Response:
        return httpx.post(
            f"{url}/api/v1/releases/{rid}/bench-reports",
            json={"report": report},
            headers=h(tokens, "operator"),
        )

    def reasons(r: httpx.Response) -> str:
        assert r.status_code == 409, r.text
        return "; ".join(r.json()["detail"]["reasons"])

    # A report proves what it claims or is refused, with every reason; nothing is stored.
    good = bench_report(bundle, "edge-cpu", BENCH_KEY)
    other = build_bundle(sample_payload, tmp_path / "o.bundle", version="2.0.1", skus=["edge-cpu"])
    assert "not this release's" in reasons(upload(bench_report(other, "edge-cpu", BENCH_KEY)))
    assert "SKU 'edge-gpu'" in reasons(upload(bench_report(bundle, "edge-gpu", BENCH_KEY)))
    assert "not signed" in reasons(upload(bench_report(bundle, "edge-cpu", None)))
    stranger = bench_report(bundle, "edge-cpu", Ed25519PrivateKey.generate())
    assert "does not know" in reasons(upload(stranger))
    edited = {**good, "results": [{**r, "status": "passed"} for r in good["results"]], "complete": True}
    edited["suite"] = "smoke"  # any change after signing
    assert "changed after the bench signed it" in reasons(upload(edited))
    skipped = bench_report(
        bundle,
        "edge-cpu",
        BENCH_KEY,
        results=[
            {**r, "status": "skipped", "reason": "no --repo"} if r["name"] == "install" else r
            for r in good["results"]
        ],
    )
    assert "suite install is skipped" in reasons(upload(skipped))
    simulated = bench_report(
        bundle,
        "edge-cpu",
        BENCH_KEY,
        results=[
            {**r, "figures": {"simulated": True}} if r["name"] == "thermal" else r for r in good["results"]
        ],
    )
    assert "simulated zone" in reasons(upload(simulated))
    wrong_rig = bench_report(
        bundle,
        "edge-cpu",
        BENCH_KEY,
        preflight={
            "verdict": "failed",
            "checks": [{"name": "architecture", "passed": False, "detail": "arm64"}],
        },
    )
    assert "pre-flight did not pass (architecture)" in reasons(upload(wrong_rig))
    assert "failed" in approve().json()["detail"] or "no bench" in approve().json()["detail"]
    assert upload(good).status_code == 201
    assert approve().json()["state"] == "scheduled"
    card = httpx.get(url + "/api/v1/releases", headers=h(tokens, "viewer")).json()[0]["model_card"]
    assert [c["section"] for c in card] == ["stage", "stage", "bench"]
    assert card[-1]["content"]["bundle_sha256"] == good["bundle"]["sha256"]


def test_without_a_repository_publishing_is_503(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    upgrade(db)
    with db.session() as s:
        token = create_token(s, name="op", role=Role.OPERATOR, now=datetime.now(UTC))
    r = TestClient(create_app(db)).post(
        "/api/v1/releases", content=b"x", headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 503 and "no update repository" in r.json()["detail"]


def test_a_release_whose_role_needs_an_approver_is_staged_then_recorded(
    served: tuple[str, dict[str, str], UpdateRepository], tmp_path: Path, sample_payload: Path
) -> None:
    """A production role of two keys: the server holds the build key, so a publish answers 202
    with the signature it waits for, records nothing, and /repo does not list it; once the
    approver's signature is imported, posting the same bundle records the release."""
    from shared.trust.keys import generate_file_key
    from shared.trust.repository import sign_envelope

    url, tokens, repo = served
    approver_uri, approver = generate_file_key(tmp_path / "approver")
    repo.delegate("safety", ["safety/*/*"], threshold=2, new_keys=1, public_keys=[approver.public_key])
    bundle = build_bundle(sample_payload, tmp_path / "s.bundle", name="safety", version="1.0.0")
    r = httpx.post(url + "/api/v1/releases", content=bundle.read_bytes(), headers=h(tokens, "operator"))
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["staged"] and body["role"] == "safety" and "1 of 2 signature" in body["waiting"][0]
    releases = httpx.get(url + "/api/v1/releases", headers=h(tokens, "viewer")).json()
    assert "safety" not in {x["name"] for x in releases}
    signed, _ = sign_envelope(UpdateRepository(repo.dir).export("safety"), approver_uri)
    UpdateRepository(repo.dir).import_signatures(signed)
    r = httpx.post(url + "/api/v1/releases", content=bundle.read_bytes(), headers=h(tokens, "operator"))
    assert r.status_code == 201, r.text
    assert r.json()["target"] == "safety/1.0.0/edge-cpu.bundle"
    audit = httpx.get(url + "/api/v1/audit?action=release.stage", headers=h(tokens, "admin")).json()
    assert audit and audit[0]["target"] == "safety/1.0.0/edge-cpu.bundle"
