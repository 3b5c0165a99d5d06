"""`tidegate fleet`: run a fleet from a terminal or a script, against a fleet server's API.

Tables by default, `--json` for scripts; exit codes in `fleet_server.client.api` (0 done, 3 not
found, 4 refused, 5 token, 6 unreachable, 7 a watched campaign that did not complete)."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from fleet_server.client.api import (
    EXIT_NOT_COMPLETED,
    FleetApiError,
    FleetClient,
    Profile,
    ProfileError,
    load_profile,
    save_profile,
)
from shared.errors import TidegateError

app = typer.Typer(
    help="Operate a fleet through a fleet server's API (devices, releases, campaigns).", no_args_is_help=True
)
device_app = typer.Typer(help="Registered devices.", no_args_is_help=True)
release_app = typer.Typer(help="Releases in the model registry.", no_args_is_help=True)
campaign_app = typer.Typer(help="Campaigns: create from a spec, approve, steer, watch.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log (admin).", no_args_is_help=True)
token_app = typer.Typer(help="Operator tokens (admin).", no_args_is_help=True)
for sub, name in (
    (device_app, "device"),
    (release_app, "release"),
    (campaign_app, "campaign"),
    (audit_app, "audit"),
    (token_app, "token"),
):
    app.add_typer(sub, name=name)

ProfileOpt = Annotated[str | None, typer.Option("--profile", help="Profile name (default: the config's).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Id = Annotated[str, typer.Argument(help="Campaign id.")]


def _client(profile: str | None) -> FleetClient:
    return FleetClient(load_profile(profile))


def _print(rows: list[dict[str, Any]] | dict[str, Any], as_json: bool, columns: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    items = [rows] if isinstance(rows, dict) else rows
    if not items:
        typer.echo("(none)")
        return
    cells = [[_cell(item.get(c)) for c in columns] for item in items]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))[:60]
    return str(value)


# ---- profile ------------------------------------------------------------------------------------


@app.command("login")
def login(
    url: Annotated[str, typer.Option(help="The fleet server, e.g. https://fleet.example:8700.")],
    token: Annotated[str, typer.Option(help="An operator token (tidegate server token create).")],
    profile: Annotated[str, typer.Option(help="Name of this profile.")] = "default",
) -> None:
    """Check the token against the server, then keep URL and token in a 0600 config file."""
    p = Profile(profile, url.rstrip("/"), token)
    with FleetClient(p) as api:
        api.get("/api/v1/fleet/summary")  # a 401 here is a bad token, not a broken profile later
    typer.echo(f"saved profile {profile!r} ({p.url}) in {save_profile(p)}")


# ---- devices ------------------------------------------------------------------------------------


@device_app.command("list")
def device_list(
    sku: Annotated[str | None, typer.Option()] = None,
    region: Annotated[str | None, typer.Option()] = None,
    version: Annotated[str | None, typer.Option(help="Active model version.")] = None,
    name: Annotated[str | None, typer.Option(help="Thing names containing this.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many (pages through the API).")] = 100,
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    with _client(profile) as api:
        rows = []
        for d in api.pages(
            "/api/v1/devices",
            "thing_name",
            "after",
            limit=min(limit, 1000),
            sku=sku,
            region=region,
            version=version,
            name=name,
        ):
            rows.append(d)
            if len(rows) >= limit:
                break
    _print(rows, as_json, ["thing_name", "sku", "region", "firmware", "active_version", "last_seen_at"])


@device_app.command("show")
def device_show(thing: str, profile: ProfileOpt = None, as_json: JsonOpt = False) -> None:
    with _client(profile) as api:
        device = api.get(f"/api/v1/devices/{thing}")
        executions = api.get("/api/v1/executions", thing=thing, limit=10)
    if as_json:
        typer.echo(json.dumps({"device": device, "executions": executions}, indent=2, default=str))
        return
    _print(device, False, ["thing_name", "sku", "region", "firmware", "agent_version", "active_version"])
    typer.echo("")
    _print(executions, False, ["id", "job_id", "status", "status_details", "last_updated_at"])


@device_app.command("log-pull")
def device_log_pull(
    thing: str,
    lines: Annotated[int, typer.Option(min=1, max=5000)] = 500,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the upload (0: do not wait).")] = 60.0,
    profile: ProfileOpt = None,
) -> None:
    """Ask the device for its recent log and print it once it has been uploaded."""
    with _client(profile) as api:
        job = api.post(f"/api/v1/devices/{thing}/log-pull", {"lines": lines})["job_id"]
        deadline = time.monotonic() + wait
        while True:
            got = [g for g in api.get(f"/api/v1/devices/{thing}/logs") if g["job_id"] == job]
            if got:
                typer.echo("\n".join(got[0]["lines"]))
                return
            if time.monotonic() >= deadline:
                why = f"{thing} has not uploaded its log yet (job {job}): try `fleet device logs` later"
                raise FleetApiError(why, 1)
            time.sleep(1.0)


@device_app.command("logs")
def device_logs(thing: str, profile: ProfileOpt = None, as_json: JsonOpt = False) -> None:
    """The logs the device uploaded for log-pull jobs, newest first."""
    with _client(profile) as api:
        got = api.get(f"/api/v1/devices/{thing}/logs")
    if as_json:
        typer.echo(json.dumps(got, indent=2, default=str))
        return
    for g in got:
        typer.echo(f"--- {g['at']} (job {g['job_id']}, {len(g['lines'])} lines)")
        typer.echo("\n".join(g["lines"]))


# ---- releases -----------------------------------------------------------------------------------

RELEASE_COLUMNS = ["id", "name", "version", "stage", "skus", "target", "created_at"]


@release_app.command("list")
def release_list(profile: ProfileOpt = None, as_json: JsonOpt = False) -> None:
    with _client(profile) as api:
        _print(api.get("/api/v1/releases"), as_json, RELEASE_COLUMNS)


@release_app.command("show")
def release_show(release_id: int, profile: ProfileOpt = None, as_json: JsonOpt = False) -> None:
    with _client(profile) as api:
        found = [r for r in api.get("/api/v1/releases") if r["id"] == release_id]
    if not found:
        raise FleetApiError(f"no release {release_id}", 3)
    _print(found[0], as_json, [*RELEASE_COLUMNS, "sha256", "model_card"])


@release_app.command("publish")
def release_publish(
    bundle: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A signed .bundle file.")],
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a bundle: the server signs it into its update repository (or stages it when the
    target's role needs another signature) and records the release."""
    with _client(profile) as api:
        out = api.request(
            "POST",
            "/api/v1/releases",
            content=bundle.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
    _print(out, as_json, list(out)[:6] if isinstance(out, dict) else RELEASE_COLUMNS)


@release_app.command("stage")
def release_stage(
    release_id: int,
    stage: Annotated[str, typer.Argument(help="candidate, staging, production or archived.")],
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    with _client(profile) as api:
        _print(api.post(f"/api/v1/releases/{release_id}/stage", {"stage": stage}), as_json, RELEASE_COLUMNS)


# ---- campaigns ----------------------------------------------------------------------------------

CAMPAIGN_COLUMNS = ["id", "name", "state", "wave", "paused_reason", "created_at"]


def read_spec(path: Path) -> dict[str, Any]:
    """A campaign spec from TOML or JSON, checked here first so a mistake names its line and
    field before anything is sent."""
    from pydantic import ValidationError

    from fleet_server.campaigns.spec import CampaignSpec

    try:
        text = path.read_text()
    except OSError as exc:
        raise TidegateError(f"{path}: {exc.strerror}") from exc
    try:
        spec = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except json.JSONDecodeError as exc:
        raise TidegateError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TidegateError(f"{path}: not valid TOML: {exc}") from exc
    try:
        CampaignSpec.model_validate(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(spec)"
        key = next((str(p) for p in reversed(first["loc"]) if isinstance(p, str)), None)
        line = next((i for i, ln in enumerate(text.splitlines(), 1) if key and key in ln), None)
        at = f"{path}:{line}" if line else str(path)
        raise TidegateError(f"{at}: {where}: {first['msg']}") from exc
    return spec


@campaign_app.command("create")
def campaign_create(
    spec_file: Annotated[Path, typer.Option("-f", "--file", help="The spec, TOML or JSON.")],
    draft: Annotated[bool, typer.Option(help="Leave it a draft (do not submit for approval).")] = False,
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a campaign from a spec file and submit it for approval (an admin approves)."""
    spec = read_spec(spec_file)
    with _client(profile) as api:
        c = api.post("/api/v1/campaigns", spec)
        if not draft:
            c = api.post(f"/api/v1/campaigns/{c['id']}/submit")
    _print(c, as_json, CAMPAIGN_COLUMNS)


@campaign_app.command("list")
def campaign_list(
    state: Annotated[str | None, typer.Option()] = None, profile: ProfileOpt = None, as_json: JsonOpt = False
) -> None:
    with _client(profile) as api:
        _print(api.get("/api/v1/campaigns", state=state), as_json, CAMPAIGN_COLUMNS)


@campaign_app.command("show")
def campaign_show(campaign_id: Id, profile: ProfileOpt = None, as_json: JsonOpt = False) -> None:
    with _client(profile) as api:
        c = api.get(f"/api/v1/campaigns/{campaign_id}")
        decisions = api.get(f"/api/v1/campaigns/{campaign_id}/decisions")
    if as_json:
        typer.echo(json.dumps({**c, "decisions": decisions}, indent=2, default=str))
        return
    _print(c, False, CAMPAIGN_COLUMNS)
    for w in c["waves"]:
        typer.echo(f"wave {w['index'] + 1}: {w['size']} devices  {_counts(w['counts'])}")
    typer.echo("")
    _print(decisions[-15:], False, ["at", "kind", "actor", "message"])


def _counts(counts: dict[str, int]) -> str:
    return " ".join(f"{k.lower()}={v}" for k, v in sorted(counts.items()))


def _action(
    campaign_id: str, verb: str, body: dict[str, Any] | None, profile: str | None, as_json: bool
) -> None:
    with _client(profile) as api:
        _print(api.post(f"/api/v1/campaigns/{campaign_id}/{verb}", body), as_json, CAMPAIGN_COLUMNS)


@campaign_app.command("approve")
def campaign_approve(
    campaign_id: Id,
    override_reason: Annotated[
        str | None, typer.Option(help="Start without a passing bench report, and say why.")
    ] = None,
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    _action(
        campaign_id,
        "approve",
        {"override_reason": override_reason} if override_reason else {},
        profile,
        as_json,
    )


@campaign_app.command("pause")
def campaign_pause(
    campaign_id: Id,
    reason: Annotated[str, typer.Option(help="Why (kept in the decision log).")] = "paused by operator",
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    _action(campaign_id, "pause", {"reason": reason}, profile, as_json)


@campaign_app.command("resume")
def campaign_resume(campaign_id: Id, profile: ProfileOpt = None, as_json: JsonOpt = False) -> None:
    _action(campaign_id, "resume", None, profile, as_json)


@campaign_app.command("next-wave")
def campaign_next_wave(campaign_id: Id, profile: ProfileOpt = None, as_json: JsonOpt = False) -> None:
    _action(campaign_id, "next-wave", None, profile, as_json)


@campaign_app.command("cancel")
def campaign_cancel(
    campaign_id: Id,
    force: Annotated[bool, typer.Option(help="Also cancel executions in progress.")] = False,
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    _action(campaign_id, "cancel", {"force": force}, profile, as_json)


@campaign_app.command("retry-failed")
def campaign_retry_failed(campaign_id: Id, profile: ProfileOpt = None, as_json: JsonOpt = False) -> None:
    """A new draft campaign over the devices this one failed on (it still needs approval)."""
    _action(campaign_id, "retry-failed", None, profile, as_json)


TERMINAL = {"completed", "canceled"}


@campaign_app.command("watch")
def campaign_watch(
    campaign_id: Id,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls.")] = 2.0,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
    until_paused: Annotated[bool, typer.Option(help="Also stop (exit 7) when it pauses.")] = True,
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-wave progress until the campaign ends: exit 0 when it completed, 7 when it was
    canceled or paused (with `--until-paused`), 6 if the server cannot be reached."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    deadline = None if timeout is None else time.monotonic() + timeout
    console = Console(stderr=as_json)
    with (
        _client(profile) as api,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console,
            transient=False,
            disable=as_json,
        ) as bars,
    ):
        tasks: dict[int, Any] = {}
        while True:
            c = api.get(f"/api/v1/campaigns/{campaign_id}")
            for w in c["waves"]:
                done = sum(
                    v for k, v in w["counts"].items() if k not in ("NOT_STARTED", "QUEUED", "IN_PROGRESS")
                )
                detail = _counts({k: v for k, v in w["counts"].items() if k != "NOT_STARTED"})
                if w["index"] not in tasks:
                    tasks[w["index"]] = bars.add_task(f"wave {w['index'] + 1}", total=w["size"], detail="")
                bars.update(tasks[w["index"]], completed=done, detail=detail)
            state = c["state"]
            if state in TERMINAL or (until_paused and state == "paused"):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise FleetApiError(f"campaign {campaign_id} still {state} after {timeout:g} s", 1)
            time.sleep(interval)
    if as_json:
        typer.echo(json.dumps(c, indent=2, default=str))
    else:
        why = f": {c['paused_reason']}" if state == "paused" and c.get("paused_reason") else ""
        typer.echo(f"campaign {campaign_id} {state}{why}")
    if state != "completed":
        raise typer.Exit(EXIT_NOT_COMPLETED)


# ---- audit and tokens ---------------------------------------------------------------------------


@audit_app.command("list")
def audit_list(
    actor: Annotated[str | None, typer.Option()] = None,
    action: Annotated[str | None, typer.Option(help="Exact, or a prefix ending in '.'.")] = None,
    target: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    with _client(profile) as api:
        rows = api.get("/api/v1/audit", actor=actor, action=action, target=target, limit=limit)
    _print(rows, as_json, ["id", "at", "actor", "action", "target", "outcome"])


TOKEN_COLUMNS = ["id", "name", "role", "expires_at", "last_used_at", "revoked"]


@token_app.command("list")
def token_list(profile: ProfileOpt = None, as_json: JsonOpt = False) -> None:
    with _client(profile) as api:
        _print(api.get("/api/v1/tokens"), as_json, TOKEN_COLUMNS)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="Who or what holds it.")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")],
    expires_days: Annotated[float | None, typer.Option(min=0.001)] = None,
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A new token, printed once (only its hash is stored)."""
    with _client(profile) as api:
        out = api.post("/api/v1/tokens", {"name": name, "role": role, "expires_days": expires_days})
    if as_json:
        typer.echo(json.dumps(out, indent=2, default=str))
    else:
        typer.echo(out["token"])


@token_app.command("revoke")
def token_revoke(token_id: int, profile: ProfileOpt = None, as_json: JsonOpt = False) -> None:
    with _client(profile) as api:
        _print(api.post(f"/api/v1/tokens/{token_id}/revoke"), as_json, TOKEN_COLUMNS)


__all__ = ["ProfileError", "app"]
