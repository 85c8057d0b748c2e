"""Support for the benchmarks and the tests, not the method: the support-matrix chain (`selfcheck`), the pruning
baselines the compression benchmark compares with (`prune`), hostile files for the readers' fuzzing
(`hostile`), and the wall time of a call on any device (`timing`)."""
