"""The broker rules as shipped for AWS IoT Core: the policy template is the rendering of the one
rule table (`fleet_server.pki.acl`), and evaluated the way IoT Core evaluates it (policy
variables substituted, `*` matching any characters) it lets a device do exactly what the
Mosquitto ACL lets it do: connect as itself, its own topics, no shared subscriptions."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest

from fleet_server.pki.acl import THING_VARIABLE, aws_iot_policy_json

ROOT = Path(__file__).parent.parent
ARN = "arn:aws:iot:eu-central-1:123456789012"


def allowed(policy: dict[str, Any], thing: str, action: str, resource: str) -> bool:
    """IoT Core's evaluation for Allow-only policies: any statement whose action and one of
    whose resources match (policy variables substituted; `*` any run, `?` one character)."""
    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if st["Effect"] != "Allow" or action not in actions:
            continue
        for pattern in resources:
            # fnmatch's [..] classes do not exist in IoT policies: escape them.
            literal = pattern.replace(THING_VARIABLE, thing).replace("[", "[[]")
            if fnmatch.fnmatchcase(resource, literal):
                return True
    return False


CASES = [
    ("iot:Connect", "client/car-1", True),
    ("iot:Connect", "client/car-2", False),  # another device's client id
    ("iot:Connect", "client/tidegate-fleet-server", False),  # the service's
    ("iot:Publish", "topic/$aws/things/car-1/jobs/start-next", True),
    ("iot:Publish", "topic/$aws/things/car-1/jobs/j-1/update", True),
    ("iot:Publish", "topic/$aws/things/car-2/jobs/j-1/update", False),
    ("iot:Publish", "topic/$aws/things/car-1/jobs/j-1/update/accepted", False),  # the service's reply
    ("iot:Publish", "topic/tidegate/things/car-1/beacon", True),
    ("iot:Publish", "topic/tidegate/things/car-2/beacon", False),
    ("iot:Publish", "topic/tidegate/things/car-1/other", False),  # only the telemetry kinds
    ("iot:Publish", "topic/tidegate/things/car-1/log", True),
    ("iot:Subscribe", "topicfilter/$aws/things/car-1/jobs/notify-next", True),
    ("iot:Subscribe", "topicfilter/$aws/things/car-1/jobs/#", True),
    ("iot:Subscribe", "topicfilter/$aws/things/+/jobs/#", False),
    ("iot:Subscribe", "topicfilter/$aws/things/car-2/jobs/notify-next", False),
    ("iot:Subscribe", "topicfilter/$share/tidegate/$aws/things/car-1/jobs/#", False),
    ("iot:Subscribe", "topicfilter/$share/tidegate/tidegate/things/+/+", False),
    ("iot:Subscribe", "topicfilter/tidegate/things/+/+", False),
    ("iot:Receive", "topic/$aws/things/car-1/jobs/notify-next", True),
    ("iot:Receive", "topic/$aws/things/car-2/jobs/notify-next", False),
    ("iot:Receive", "topic/tidegate/things/car-2/beacon", False),
]


def test_the_shipped_policy_is_the_rendering_of_the_rule_table() -> None:
    shipped = (ROOT / "deploy" / "aws-iot" / "device-policy.json").read_text()
    assert shipped == aws_iot_policy_json(), "regenerate: tidegate server ca aws-policy > deploy/aws-iot/…"
    policy = json.loads(shipped)
    assert policy["Version"] == "2012-10-17"
    connect = next(s for s in policy["Statement"] if s["Action"] == "iot:Connect")
    assert connect["Condition"] == {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}


@pytest.mark.parametrize(("action", "resource", "expected"), CASES)
def test_a_device_may_do_what_the_acl_allows_and_nothing_else(
    action: str, resource: str, expected: bool
) -> None:
    policy = json.loads(aws_iot_policy_json("eu-central-1", "123456789012"))
    assert allowed(policy, "car-1", action, f"{ARN}:{resource}") is expected


def test_the_cli_fills_in_region_and_account() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tidegate",
            "server",
            "ca",
            "aws-policy",
            "--region",
            "eu-central-1",
            "--account",
            "123456789012",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert json.loads(out) == json.loads(aws_iot_policy_json("eu-central-1", "123456789012"))
    assert "REGION" not in out and "ACCOUNT_ID" not in out
