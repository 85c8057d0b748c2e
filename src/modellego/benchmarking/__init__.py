"""Support for the benchmarks and the tests, not the method: the support-matrix chain (`selfcheck`), the pruning
baselines the compression benchmark compares with (`prune`), and hostile files for the readers' fuzzing
(`hostile`)."""
