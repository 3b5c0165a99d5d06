"""An embedded MQTT broker for a single machine: a private Mosquitto on a free localhost port.

Production points the server and agents at a real broker (Mosquitto, EMQX, HiveMQ, AWS IoT
Core); the demo and a one-box install start this one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from shared.errors import TidegateError
from shared.net import free_port
from shared.procs import die_with_parent


class EmbeddedBroker:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if binary is None:
            raise TidegateError(
                "no MQTT broker: install Mosquitto (Debian: apt-get install mosquitto) "
                "or point TIDEGATE_MQTT_HOST/PORT at a broker"
            )
        self.binary, self.dir, self.port = binary, workdir, port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "mosquitto.conf"
        text = (
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            # A simulated fleet holds one connection for every device it plays: a bound of
            # 1,000,000 queued messages keeps its replies and notifications from being dropped
            # in a burst (a device that lost a notification would wait for ever); the log says
            # when one is.
            f"persistence_location {self.dir}/\nmax_queued_messages 1000000\n"
            f"log_dest file {self.dir}/mosquitto.log\nlog_type error\nlog_type warning\nlog_type notice\n"
        )
        if os.geteuid() == 0:
            text += "user root\n"
        conf.write_text(text)
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # noqa: PLW1509  (only prctl: safe between fork and exec)
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise TidegateError(f"the embedded Mosquitto did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
