"""Benchmarks that print ratios measured side by side in one run: `python -m bench.run`.

Nothing here asserts on time: every figure is printed (and optionally written as JSON) for a
person to read next to its baseline.
"""
