"""Benchmarks for taskspace: ``python -m bench queue --backend sqlite|memory|redis`` and
``python -m bench peers`` (taskspace next to Celery, RQ, Dramatiq, Huey and arq).

Not part of the installed package; run from the project root (``make bench``).
"""
