"""Benchmarks: ``python -m tests.benchmarks.run`` (``make bench``). Not part of ``make test``."""
