"""Benchmarks of the pyencoder ops: `python -m benchmarks` runs them all (see __main__.py)."""
