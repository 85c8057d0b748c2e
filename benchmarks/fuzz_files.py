"""Fuzz every file reader (model `load`, `read_manifest`, `load_profile`) with many more cases than the test
suite, then measure the memory bombs one per fresh process.

    python benchmarks/fuzz_files.py [--examples 2000]      # needs hypothesis (pip install 'modellego[test]')

Prints: cases run, outcomes, the slowest refusal, and the peak RSS of each memory-bomb case (each in a fresh
Python with a 2 GB address-space allowance beyond what importing torch takes).
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modellego.benchmarking import hostile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="cases per file kind")
    args = parser.parse_args()
    junk, tensor_changes = hostile.strategies()
    outcomes: collections.Counter = collections.Counter()
    slowest = (0.0, "")

    def record(kind: str, reader: str, path: Path) -> None:
        nonlocal slowest
        started = time.perf_counter()
        outcome = hostile.read_with(reader, path)  # any other exception stops the run: a bug
        seconds = time.perf_counter() - started
        outcomes[f"{kind} {reader}: {'loaded' if outcome == 'loaded' else 'refused'}"] += 1
        if outcome != "loaded" and seconds > slowest[0]:
            slowest = (seconds, outcome[:160])

    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(fields=st.lists(st.tuples(st.sampled_from(hostile.MODEL_FIELDS),
                                     st.one_of(junk, st.just("DELETE"))), max_size=4),
           change=tensor_changes)
    def models(fields, change):
        tensors, manifest = hostile.model_parts()
        for path, value in fields:
            hostile.set_path(manifest, path, value)
        with tempfile.TemporaryDirectory() as folder:
            path = hostile.write_raw(Path(folder) / "m.safetensors", hostile.mutate_tensors(tensors, change),
                                     hostile.json_text(manifest))
            record("model", "read_manifest", path)
            record("model", "load", path)

    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(fields=st.lists(st.tuples(st.sampled_from(hostile.PROFILE_FIELDS),
                                     st.one_of(junk, st.just("DELETE"))), max_size=4),
           change=tensor_changes)
    def profiles(fields, change):
        tensors, header = hostile.profile_parts()
        for path, value in fields:
            hostile.set_path(header, path, value)
        with tempfile.TemporaryDirectory() as folder:
            path = hostile.write_raw(Path(folder) / "p.safetensors", hostile.mutate_tensors(tensors, change),
                                     hostile.json_text(header), key="modellego-profile")
            record("profile", "profile", path)

    started = time.perf_counter()
    models()
    profiles()
    print(f"cases run: {sum(outcomes.values()):,} reads in {time.perf_counter() - started:.0f} s, "
          "no exception other than ModellegoError")
    for name, count in sorted(outcomes.items()):
        print(f"  {name}: {count:,}")
    print(f"slowest refusal: {slowest[0]:.3f} s ({slowest[1]})")
    print("memory bombs, each in a fresh process (peak RSS includes ~690 MB for importing torch + torchvision):")
    baseline = None
    with tempfile.TemporaryDirectory() as folder:
        cases = hostile.bombs(Path(folder))
        good = hostile.write_model(Path(folder), "good.safetensors")
        cases = {"(baseline: a valid LeNet-5 file)": ("load", good), **cases}
        worst = (0.0, "")
        for name, (reader, path) in cases.items():
            result = hostile.measure_in_subprocess(reader, path)
            baseline = baseline or result["peak_rss_mb"]
            outcome = result["outcome"].split(" (")[0].replace(str(path), "FILE")
            print(f"  {name}: {result['seconds']:.3f} s, peak RSS {result['peak_rss_mb']:.0f} MB — {outcome[:110]}")
            if name != "(baseline: a valid LeNet-5 file)" and result["peak_rss_mb"] > worst[0]:
                worst = (result["peak_rss_mb"], name)
        print(f"worst case peak RSS: {worst[0]:.0f} MB ({worst[1]}); baseline {baseline:.0f} MB")


if __name__ == "__main__":
    main()
