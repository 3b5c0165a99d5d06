"""The deployment files name only what exists: every `tidegate` command and option they run,
every TIDEGATE_* variable they set, every probe path and port, every metric an autoscaler
reads. The images are built and the compose file run on this machine by
deploy/container/build-local.sh and smoke_local.py (minutes, and Debian's mirror and PyPI:
not in `make test`); this is what keeps the files honest on every commit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tidegate.envcheck import known_variables

DEPLOY = Path(__file__).parent.parent / "deploy"
HELP: dict[tuple[str, ...], str] = {}


def tidegate_help(words: tuple[str, ...]) -> str:
    if words not in HELP:
        command = [sys.executable, "-m", "tidegate", *words, "--help"]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (words, proc.stderr)
        HELP[words] = proc.stdout
    return HELP[words]


def check_command(args: list[str], where: str) -> None:
    words = tuple(a for a in args if not a.startswith("-"))[:2]
    if words[:1] == ("serve",) and words[1:] != ("shadow-worker",):
        words = ("serve",)  # the rest is the option's value
    text = tidegate_help(words)
    for option in (a for a in args if a.startswith("--")):
        assert option in text, f"{where}: tidegate {' '.join(words)} has no {option}"


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def test_compose_runs_real_commands_with_known_settings() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    known = known_variables()
    ran = 0
    for name, service in compose["services"].items():
        if service.get("image", "").startswith("tidegate:"):
            check_command(service["command"], f"compose {name}")
            ran += 1
        for var in service.get("environment") or {}:
            if var.startswith("TIDEGATE_"):
                assert var in known, f"compose {name}: {var} is not a Tidegate setting"
    assert ran >= 6  # migrate, two fleet servers, an API-only one, two gateways
    fleet = [s for n, s in compose["services"].items() if n.startswith("fleet-")]
    ids = [s["environment"]["TIDEGATE_MQTT_CLIENT_ID"] for s in fleet]
    assert len(ids) == len(set(ids)) == 3  # one MQTT identity per replica, the API-only one too
    assert [s["command"].count("--api-only") for s in fleet] == [0, 0, 1]
    gateways = [s for n, s in compose["services"].items() if n.startswith("gateway-")]
    names = [s["hostname"] for s in gateways]
    assert len(names) == len(set(names)) == 2  # the replica ids (serving.compose.toml sets none)


def test_the_compose_gateways_are_replicas_of_one_release_state() -> None:
    from cloud_serving.config import load_config

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        if not name.startswith("gateway-"):
            continue
        config = service["command"][service["command"].index("--config") + 1]
        mounted = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
        cfg = load_config(DEPLOY / mounted[config])
        replication = cfg.gateway.replication
        assert replication is not None and replication.replica_id is None, name
        assert "@postgres/" in replication.url and "postgres" in service["depends_on"], name


def test_kubernetes_manifests_probe_real_routes_and_scale_on_real_metrics() -> None:
    from fleet_server.app import create_app as fleet_app
    from fleet_server.db import Database

    fleet_routes = {getattr(r, "path", None) for r in fleet_app(Database("sqlite://")).routes}
    gateway_source = (Path(__file__).parent.parent / "cloud_serving" / "app.py").read_text()
    kinds: dict[str, int] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
            for c in containers(doc):
                check_command(c["args"], f"{path.name} {c['name']}")
                port = c["args"][c["args"].index("--port") + 1] if "--port" in c["args"] else None
                for probe in ("readinessProbe", "livenessProbe"):
                    if probe in c and "tcpSocket" in c[probe]:
                        assert str(c[probe]["tcpSocket"]["port"]) == port, (path.name, probe)
                    elif probe in c:
                        get = c[probe]["httpGet"]
                        assert str(get["port"]) == port, (path.name, probe)
                        if c["args"][0] == "server":
                            assert get["path"] in fleet_routes, (path.name, get["path"])
                        else:
                            assert f'@app.get("{get["path"]}"' in gateway_source, (path.name, get["path"])
                for env in c.get("env", []):
                    assert env["name"] in known_variables(), (path.name, env["name"])
            if doc["kind"] == "ScaledObject":
                for trigger in doc["spec"]["triggers"]:
                    if trigger["type"] == "prometheus":
                        for metric in re.findall(r"tidegate_\w+", trigger["metadata"]["query"]):
                            assert f'"{metric}"' in gateway_source, f"the gateway exports no {metric}"
    assert kinds["Deployment"] == 4 and kinds["PodDisruptionBudget"] == 3  # fleet, fleet API, gateway
    assert kinds["ScaledObject"] == 1 and kinds["HorizontalPodAutoscaler"] == 2  # fleet, shadow workers


def test_the_image_runs_as_a_non_root_user_from_pinned_bases() -> None:
    text = (DEPLOY / "container" / "Containerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], b)
        for b in re.findall(r"^FROM (\S+)", text, flags=re.M)
    ]
    assert len(bases) == 2 and all(re.search(r":\d+\.\d+\.\d+", b) for b in bases)  # multi-stage, pinned
    # The compose file's fleet servers and gateways reach PostgreSQL: the driver is in the image.
    assert '"tidegate[postgres]"' in text and '".[postgres]"' in text
    assert re.search(r"^USER 10001$", text, flags=re.M)
    cmd = re.search(r"^CMD \[(.*)\]$", text, flags=re.M)
    assert cmd is not None
    check_command([a.strip().strip('"') for a in cmd.group(1).split(",")], "Containerfile CMD")


def test_the_compose_broker_listens_beyond_its_container_and_the_local_file_only_swaps_images() -> None:
    """Mosquitto 2 without a listener serves localhost only: the fleet servers in the other
    containers could not connect (found running the file here). compose.local.yaml changes
    images and host ports only, to stand-ins build-local.sh builds."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(m.rsplit(":", 2)[:2][::-1] for m in compose["services"]["mosquitto"]["volumes"])
    conf = (DEPLOY / mounts["/mosquitto/config/mosquitto.conf"]).read_text()
    assert re.search(r"^listener 1883$", conf, flags=re.M)
    text = (DEPLOY / "compose.local.yaml").read_text()
    local = yaml.safe_load(text.replace("!reset", ""))
    built = (DEPLOY / "container" / "build-local.sh").read_text()
    for name, service in local["services"].items():
        assert name in compose["services"] and set(service) <= {"image", "ports"}, name
        image = service["image"]
        stem = image.removeprefix("localhost/tidegate-standin-").split(":")[0]
        assert (DEPLOY / "container" / "local" / f"Containerfile.{stem}").exists(), image
        assert "tidegate-standin-$name:1" in built and image.endswith(":1"), image
    assert {"postgres", "mosquitto", "prometheus"} <= set(local["services"])
