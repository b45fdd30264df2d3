"""torchq benchmarks: ``python benchmarks/bench_linear.py --help``. See benchmarks/README.md."""
