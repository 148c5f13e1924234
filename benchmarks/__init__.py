"""HeadCT-Serve benchmark suite: `python -m benchmarks [--quick]` (`make bench` / `make bench-quick`).

Every comparison is measured side by side in one run and reported as a ratio, because the machines are
shared and noisy: absolute numbers drift between runs, ratios of interleaved measurements much less.
"""
