"""`make bench`: run every benchmark, each in a fresh interpreter (no shared warm-up).

python -m bench.run_all            # full sizes, as recorded in docs/BENCHMARKS.md
python -m bench.run_all --quick    # small sizes: a smoke run that the scripts still work
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("bench.handler_import", "bench.workflow_overhead", "bench.checkpoint", "bench.recovery")
# Only these accept --quick; the others are small enough to always run at full size.
QUICK_CAPABLE = {"bench.checkpoint", "bench.recovery"}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    quick = "--quick" in args
    failures = []
    for module in BENCHMARKS:
        command = [sys.executable, "-m", module]
        if quick and module in QUICK_CAPABLE:
            command.append("--quick")
        print(f"\n=== {' '.join(command[1:])}", flush=True)
        if subprocess.run(command, check=False).returncode != 0:
            failures.append(module)
    if failures:
        print(f"\nfailed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
