"""Benchmark harness for the category-suggester stack: `python -m bench` (see __main__)."""
