"""Benchmarks: run as scripts, e.g. `python bench/judge_pool.py`."""
