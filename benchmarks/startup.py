"""How fast `modellego --help` and `modellego --version` answer: the quick path (cli/quick.py, no torch) against
the application path they took before (typer's help and version after importing torch and every command), each a
fresh process, measured alternately in one run; the median of each and their ratio.

    python benchmarks/startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

APPLICATION = "import sys; from modellego.cli.application import main; sys.argv = ['modellego', *sys.argv[1:]]; main()"


def seconds(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {result.stderr.strip()[-300:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print("| command | quick path (s) | through the application (s) | ratio |")
    print("|---|---:|---:|---:|")
    for flag in ("--help", "--version"):
        quick, full = [], []
        for _ in range(args.repeats):
            quick.append(seconds([sys.executable, "-m", "modellego", flag]))
            full.append(seconds([sys.executable, "-c", APPLICATION, flag]))
        fast, slow = statistics.median(quick), statistics.median(full)
        print(f"| `modellego {flag}` | {fast:.3f} | {slow:.3f} | {slow / fast:.0f}× |")


if __name__ == "__main__":
    main()
