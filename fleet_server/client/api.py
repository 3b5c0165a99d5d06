"""The fleet server's HTTP API from an operator's machine: a profile (URL and token), one
httpx client with explicit timeouts, and every failure a named error with an exit code a
script can branch on. Nothing here touches the database or imports the server's ORM."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from shared.errors import TidegateError
from shared.fsutil import atomic_write_bytes

CONFIG_ENV = "TIDEGATE_FLEET_CONFIG"
URL_ENV = "TIDEGATE_SERVER_URL"
TOKEN_ENV = "TIDEGATE_TOKEN"
PROFILE_ENV = "TIDEGATE_PROFILE"

# Exit codes (README "Fleet CLI"): 0 done; 1 any other error; 2 usage; the rest by cause.
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4  # the server understood and said no (409, 422)
EXIT_AUTH = 5  # no, expired or revoked token; or a role too low (401, 403)
EXIT_UNREACHABLE = 6
EXIT_NOT_COMPLETED = 7  # `campaign watch`: the campaign ended paused or canceled


class FleetApiError(TidegateError):
    def __init__(self, message: str, exit_code: int = 1, status: int | None = None) -> None:
        super().__init__(message)
        self.exit_code, self.status = exit_code, status


class ProfileError(TidegateError):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    url: str
    token: str


def config_path() -> Path:
    if explicit := os.environ.get(CONFIG_ENV):
        return Path(explicit)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "tidegate" / "fleet.toml"


def _read_config(path: Path) -> dict[str, Any]:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text()
    except FileNotFoundError:
        return {}
    if mode & 0o077:
        raise ProfileError(f"{path} is mode {mode:o}: it holds tokens, make it 0600 (chmod 600 {path})")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from exc


def load_profile(name: str | None = None) -> Profile:
    """The environment (TIDEGATE_SERVER_URL and TIDEGATE_TOKEN) wins; otherwise the named
    profile, TIDEGATE_PROFILE, or the config file's default."""
    url, token = os.environ.get(URL_ENV), os.environ.get(TOKEN_ENV)
    if url and token and name is None:
        return Profile("environment", url.rstrip("/"), token)
    path = config_path()
    config = _read_config(path)
    chosen = name or os.environ.get(PROFILE_ENV) or config.get("default")
    if chosen is None:
        raise ProfileError(
            f"no fleet server configured: run `tidegate fleet login --url URL --token TOKEN`, or set "
            f"{URL_ENV} and {TOKEN_ENV}"
        )
    entry = config.get("profiles", {}).get(chosen)
    if entry is None:
        raise ProfileError(f"no profile {chosen!r} in {path}")
    if not entry.get("url"):
        raise ProfileError(f"profile {chosen!r} in {path} has no url")
    if not (token := token or entry.get("token")):
        raise ProfileError(f"profile {chosen!r} in {path} has no token (or set {TOKEN_ENV})")
    return Profile(chosen, (url or entry["url"]).rstrip("/"), token)


def save_profile(profile: Profile, *, make_default: bool = True) -> Path:
    """Write the profile into the config file, 0600, keeping the others."""
    path = config_path()
    config = _read_config(path)
    profiles = dict(config.get("profiles", {}))
    profiles[profile.name] = {"url": profile.url, "token": profile.token}
    default = profile.name if make_default or "default" not in config else config["default"]
    lines = [f"default = {json.dumps(default)}", ""]
    for name, entry in sorted(profiles.items()):
        lines += [f"[profiles.{json.dumps(name)}]", f"url = {json.dumps(entry['url'])}"]
        lines += [f"token = {json.dumps(entry['token'])}", ""]
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(path, "\n".join(lines).encode(), mode=0o600)
    return path


class FleetClient:
    """GET/POST against /api/v1 with the profile's token; every timeout explicit."""

    def __init__(self, profile: Profile, *, timeout_s: float = 30.0) -> None:
        self.profile = profile
        self.http = httpx.Client(
            base_url=profile.url,
            headers={"Authorization": f"Bearer {profile.token}"},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
        )

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise FleetApiError(f"{self.profile.url}: timed out ({exc})", EXIT_UNREACHABLE) from exc
        except httpx.TransportError as exc:
            raise FleetApiError(f"cannot reach {self.profile.url}: {exc}", EXIT_UNREACHABLE) from exc
        if r.status_code >= 400:
            raise _error(r)
        return r.json() if r.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return (
            self.request("POST", path, json=body, **kwargs)
            if "content" not in kwargs
            else self.request("POST", path, **kwargs)
        )

    def pages(self, path: str, key: str, cursor: str, *, limit: int = 500, **params: Any) -> Iterator[Any]:
        """Every item of a cursor-paged list (`cursor` = the query parameter, `key` = the
        item's field it takes)."""
        last: Any = None
        while True:
            page = self.get(path, limit=limit, **{cursor: last}, **params)
            yield from page
            if len(page) < limit:
                return
            last = page[-1][key]


def _error(r: httpx.Response) -> FleetApiError:
    try:
        detail: Any = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    if isinstance(detail, list):  # pydantic's list of field errors: the first names the field
        first = detail[0] if detail else {}
        where = ".".join(str(p) for p in first.get("loc", [])[1:]) or "body"
        detail = f"{where}: {first.get('msg', 'invalid')}"
    elif isinstance(detail, dict):
        detail = "; ".join([str(detail.get("message", "")), *map(str, detail.get("reasons", []))])
    code = {401: EXIT_AUTH, 403: EXIT_AUTH, 404: EXIT_NOT_FOUND, 409: EXIT_REFUSED, 422: EXIT_REFUSED}
    return FleetApiError(f"HTTP {r.status_code}: {detail}", code.get(r.status_code, 1), r.status_code)
