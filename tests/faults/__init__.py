"""Fault injection: real worker processes, real signals (SIGKILL, SIGSTOP/SIGCONT,
SIGTERM), on every backend in ``harness.FAULT_BACKENDS``.

Run with ``python -m pytest tests/faults -q`` (or ``-m fault``); set
``TASKSPACE_FAULT_SEED`` to replay the soak test's fault schedule.
"""
