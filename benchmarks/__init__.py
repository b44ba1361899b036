"""Runnable benchmarks: ``python -m benchmarks.<name>``.

Each prints its figures as one JSON line, last on stdout: ``{"benchmark": "<name>", ...}``.
Speed targets live here, never in timed tests (DESIGN.md, "Observable contracts").
"""
