"""Benchmarks of the `recipe` package: experiment configs (``benchmarks/experiments/*.yaml``), the runner
(``python -m benchmarks.run EXPERIMENT``) and the results it writes (``benchmarks/results/``)."""
