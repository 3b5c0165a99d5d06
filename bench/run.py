"""`make bench`: run every benchmark; sizes scale with TIDEGATE_BENCH_MB (default 128)."""

from __future__ import annotations

import os

from bench import agent_install, agent_runtime, bundle_read


def main() -> None:
    size_mb = int(os.environ.get("TIDEGATE_BENCH_MB", "128"))
    bundle_read.run(size_mb)
    sizes = [int(s) for s in os.environ.get("TIDEGATE_BENCH_INSTALL_MB", "256,1024").split(",")]
    agent_install.run(sizes)
    agent_runtime.run(float(os.environ.get("TIDEGATE_BENCH_IDLE_S", "60")))


if __name__ == "__main__":
    main()
