"""`make bench`: exo-master against sglang-router, real processes on loopback (see scripts/bench_all.py)."""
