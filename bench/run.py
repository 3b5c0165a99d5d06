"""`make bench`: run every benchmark. Sizes: TIDEGATE_BENCH_MB (bundle read, default 128),
TIDEGATE_BENCH_INSTALL_MB, TIDEGATE_BENCH_IDLE_S, TIDEGATE_BENCH_DEVICES (fleet, default 10000);
TIDEGATE_BENCH_PG_URL adds a PostgreSQL run of the fleet campaign and the gateway replicas."""

from __future__ import annotations

import os

from bench import (
    agent_install,
    agent_runtime,
    builder_build,
    bundle_read,
    cloud_serving,
    device_list,
    drift,
    fleet_campaign,
    gateway_replicas,
    hil_container,
    jobs_flood,
    observability,
    release_gates,
)


def main() -> None:
    size_mb = int(os.environ.get("TIDEGATE_BENCH_MB", "128"))
    bundle_read.run(size_mb)
    sizes = [int(s) for s in os.environ.get("TIDEGATE_BENCH_INSTALL_MB", "256,1024").split(",")]
    agent_install.run(sizes)
    agent_runtime.run(float(os.environ.get("TIDEGATE_BENCH_IDLE_S", "60")))
    builder_build.run()
    cloud_serving.run()
    if pg_url := os.environ.get("TIDEGATE_BENCH_PG_URL"):
        gateway_replicas.run(pg_url)
    drift.run()
    observability.run()
    release_gates.run()
    fleet_campaign.run(int(os.environ.get("TIDEGATE_BENCH_DEVICES", "10000")))
    jobs_flood.run()
    device_list.run()
    hil_container.run()


if __name__ == "__main__":
    main()
