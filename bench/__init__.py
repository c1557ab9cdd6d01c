"""Benchmarks: each module is runnable (`python -m bench.bench_X`) and writes its
figures under its own key in bench/results.json (see bench/common.py)."""
