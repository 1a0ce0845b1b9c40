"""Benchmarks for taskspace: ``python -m bench queue --backend sqlite|memory``.

Not part of the installed package; run from the project root (``make bench``).
"""
