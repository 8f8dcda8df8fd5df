"""autojac's benchmark suite: every fixed strategy, autojac after tuning, the tutorials' recipes
and the machine's matmul ceiling, timed side by side in one process.

Run it with `python -m benchmarks.run` (everything) or `python -m benchmarks.run --quick`.
"""
