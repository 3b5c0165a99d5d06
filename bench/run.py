"""`make bench`: run every benchmark; sizes scale with TIDEGATE_BENCH_MB (default 128)."""

from __future__ import annotations

import os

from bench import bundle_read


def main() -> None:
    size_mb = int(os.environ.get("TIDEGATE_BENCH_MB", "128"))
    bundle_read.run(size_mb)


if __name__ == "__main__":
    main()
