"""The device root: identity, trust anchor, slots, state and downloads in one directory.

ROOT/device.json          device id, SKU and agent settings
ROOT/trust/root.json      the trusted TUF root given at provisioning
ROOT/trust/cache/         metadata python-tuf has verified since
ROOT/slots/{a,b}/         the two slots
ROOT/current -> slots/X   the active pointer
ROOT/state.json           the install state machine
ROOT/downloads/           bundles being fetched (``.part`` files resume)
ROOT/lock                 one agent process at a time
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import AgentError, BusyError, NotProvisionedError
from agent.slots import DirectorySlotBackend
from agent.state import AgentState, StateStore
from shared.fsutil import atomic_write_bytes
from shared.trust import TrustClient
from shared.trust.errors import TrustError
from shared.trust.fetcher import RetryPolicy, TidegateFetcher, Timeouts


class DeviceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9:_-]+$")
    # The catalogue's naming rule (config/skus.toml): a typo such as "Edge CPU" is refused at
    # provisioning instead of making a device no campaign's cohort will ever match.
    sku: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    max_trial_boots: int = Field(default=3, ge=1, le=100)
    max_transitions: int = Field(default=60, ge=10)
    reserve_mb: float = Field(default=64.0, ge=0)
    self_test_timeout_s: float = Field(default=300.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0)
    download_attempts: int = Field(default=6, ge=1, le=100)
    download_base_delay_s: float = Field(default=0.5, ge=0)
    download_max_delay_s: float = Field(default=60.0, ge=0)
    # Device hooks (agent.hooks): the owner's scripts before download, before install, after
    # commit and on rollback. None: no hooks.
    hooks_dir: str | None = Field(default=None, max_length=4096)
    hook_timeout_s: float = Field(default=30.0, gt=0, le=3600)


class DeviceRoot:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config_path = root / "device.json"
        self.trust_dir = root / "trust"
        self.downloads = root / "downloads"
        self.state = StateStore(root / "state.json")
        self.slots = DirectorySlotBackend(root)

    @classmethod
    def provision(cls, root: Path, config: DeviceConfig, trusted_root: bytes) -> DeviceRoot:
        """Lay out a new device root. Refuses one that is already provisioned."""
        dev = cls(root)
        if dev.config_path.exists():
            raise AgentError(f"{root}: already provisioned as {dev.load_config().device_id}")
        try:
            json.loads(trusted_root)["signed"]["_type"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AgentError("trusted root is not TUF root metadata") from exc
        root.mkdir(parents=True, exist_ok=True)
        (dev.trust_dir / "cache").mkdir(parents=True, exist_ok=True)
        dev.downloads.mkdir(exist_ok=True)
        dev.slots.create()
        atomic_write_bytes(dev.trust_dir / "root.json", trusted_root)
        dev.state.save(AgentState())
        atomic_write_bytes(dev.config_path, config.model_dump_json(indent=2).encode())
        return dev

    def load_config(self) -> DeviceConfig:
        try:
            return DeviceConfig.model_validate_json(self.config_path.read_bytes())
        except FileNotFoundError as exc:
            raise NotProvisionedError(
                f"{self.root}: not a provisioned device root (run 'tidegate agent provision')"
            ) from exc
        except ValidationError as exc:
            raise AgentError(f"{self.config_path}: invalid ({str(exc).splitlines()[0]})") from exc

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the device lock; the kernel drops it if the process dies."""
        self.load_config()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise BusyError(f"{self.root}: another agent process is working on this device") from exc
            yield
        finally:
            os.close(fd)

    def trust_client(self, repository: str) -> TrustClient:
        """A client that starts from the newest root this device has verified."""
        cfg = self.load_config()
        fetcher = TidegateFetcher(
            Timeouts(connect=cfg.connect_timeout_s, read=cfg.read_timeout_s),
            RetryPolicy(cfg.download_attempts, cfg.download_base_delay_s, cfg.download_max_delay_s),
            user_agent=f"tidegate-agent/{cfg.device_id}",
        )
        cache = self.trust_dir / "cache"
        cached, provisioned = cache / "root.json", self.trust_dir / "root.json"

        def client(anchor: Path) -> TrustClient:
            return TrustClient(
                repository=repository, trusted_root=anchor.read_bytes(), cache_dir=cache, fetcher=fetcher
            )

        if not cached.exists():
            return client(provisioned)
        try:
            return client(cached)
        except TrustError:
            return client(provisioned)  # a damaged cache must not brick updates
