"""How fast `modellego --help`, `--version` and a command's `--help` answer: today's path (cli/quick.py for the
first two, the application without torch for the third) against the path they took before (everything imported
first, torch with it), each a fresh process, measured alternately in one run; the median of each and their
ratio.

    python benchmarks/startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

APPLICATION = ("import sys, torch, modellego.commands; from modellego.cli.application import main; "
               "sys.argv = ['modellego', *sys.argv[1:]]; main()")


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
    print("| command | today (s) | with torch imported first, as before (s) | ratio |")
    print("|---|---:|---:|---:|")
    for flags in (["--help"], ["--version"], ["train", "--help"]):
        quick, full = [], []
        for _ in range(args.repeats):
            quick.append(seconds([sys.executable, "-m", "modellego", *flags]))
            full.append(seconds([sys.executable, "-c", APPLICATION, *flags]))
        fast, slow = statistics.median(quick), statistics.median(full)
        print(f"| `modellego {' '.join(flags)}` | {fast:.3f} | {slow:.3f} | {slow / fast:.0f}× |")


if __name__ == "__main__":
    main()
