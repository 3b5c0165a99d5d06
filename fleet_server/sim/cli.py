"""`tidegate sim`: register N simulated devices with a fleet server and run them until stopped."""

import time
from typing import Annotated

import httpx
import typer

from fleet_server.sim.fleet import SimSettings, SimulatedFleet
from shared.errors import TidegateError

app = typer.Typer(help="Simulate a fleet of protocol-accurate devices against a fleet server.")


@app.callback(invoke_without_command=True)
def sim(
    devices: Annotated[int, typer.Option(min=1, max=1_000_000, help="How many devices.")],
    server: Annotated[str, typer.Option(help="Fleet server URL, e.g. http://127.0.0.1:8700.")],
    token: Annotated[str, typer.Option(envvar="TIDEGATE_TOKEN", help="An operator token.")],
    sku: Annotated[str, typer.Option(help="SKU of every simulated device.")] = "sim-sku",
    prefix: Annotated[str, typer.Option(help="Thing name prefix.")] = "sim-",
    mqtt_host: Annotated[str, typer.Option(help="MQTT broker host.")] = "127.0.0.1",
    mqtt_port: Annotated[int, typer.Option(help="MQTT broker port.")] = 1883,
    fail_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of devices whose install fails.")
    ] = 0.0,
    unmet_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share waiting on unmet preconditions.")
    ] = 0.0,
    duration_s: Annotated[float, typer.Option(help="Stop after this long (0: until Ctrl-C).")] = 0.0,
) -> None:
    """Register the devices (POST /api/v1/devices/batch), then answer every job as an agent would."""
    things = [f"{prefix}{i:06d}" for i in range(devices)]
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=server, headers=headers, timeout=httpx.Timeout(10.0)) as client:
        for i in range(0, len(things), 5000):
            batch = [{"thing_name": t, "sku": sku} for t in things[i : i + 5000]]
            try:
                r = client.post("/api/v1/devices/batch", json={"devices": batch})
            except httpx.HTTPError as exc:
                raise TidegateError(f"{server}: {exc}") from exc
            if r.status_code >= 400:
                raise TidegateError(f"registering devices: HTTP {r.status_code}: {r.text[:200]}")
    fleet = SimulatedFleet(
        things, SimSettings(host=mqtt_host, port=mqtt_port, fail_rate=fail_rate, unmet_rate=unmet_rate)
    )
    try:
        fleet.start()
    except TimeoutError as exc:
        raise TidegateError(str(exc)) from exc
    fleet.poll_all()
    typer.echo(f"{devices} simulated devices ({sku}) online; Ctrl-C to stop")
    t0 = time.monotonic()
    try:
        while duration_s <= 0 or time.monotonic() - t0 < duration_s:
            time.sleep(5)
            s = fleet.stats
            typer.echo(
                f"started {s.started} succeeded {s.succeeded} failed {s.failed} waiting {s.waiting} "
                f"updates {s.updates_sent}"
            )
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
