"""Peer task queues (Celery, RQ, Dramatiq, Huey, arq) for ``python -m bench peers``.

Everything in this package runs in the benchmark's own virtual environment
(``.bench-venv``, made by :mod:`bench.peers`), never in the project's: the peers are not
project dependencies, and neither the ``taskspace`` package nor its tests import them.
``driver`` is the entry point; each ``*_app`` module is one peer's app, its no-op task and
its client side; ``common`` holds what they share (stdlib and redis-py only).
"""
