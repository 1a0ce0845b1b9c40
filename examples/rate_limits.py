"""Global rate limits: a token budget for a model, a task option, and a 429.

One limiter is one budget for every process that opens the space (here
memory://, so one process; use sqlite:// or redis:// to share it).

Run: python examples/rate_limits.py
"""

from __future__ import annotations

import time

from taskspace import RateLimited, Space, current_task

space = Space("memory://examples")

# Requests and tokens per second, and at most 2 calls in flight at once.
model = space.rate_limit(
    "model", limits={"requests": "20/s", "tokens": "4000/s"}, burst={"tokens": 2000}, concurrency=2
)


def call_model(prompt: str) -> str:
    """A stand-in for an API call: charged by its token count."""
    tokens = 100 * len(prompt.split())
    with model.acquire({"requests": 1, "tokens": tokens}, wait=10):
        time.sleep(0.01)
        return prompt.upper()


@space.task(rate_limit="10/s", max_attempts=1)
def summarize(text: str) -> str:
    """At most 10 runs a second across every worker; waiting costs no attempt."""
    return call_model(text)


failures = {"flaky": 0}


@space.task(max_attempts=1)
def flaky_api() -> str:
    """Answers 429 once: rescheduled after retry_after, the attempt not spent."""
    failures["flaky"] += 1
    if failures["flaky"] == 1:
        raise RateLimited("HTTP 429 Too Many Requests", retry_after=0.2)
    return f"ok on attempt {current_task().attempt}"


def main() -> None:
    began = time.monotonic()
    handles = summarize.submit_many([(f"document {i} says hello",) for i in range(15)])
    flaky = flaky_api.submit()
    report = space.run_worker(burst=True, install_signal_handlers=False, concurrency=4)
    took = time.monotonic() - began
    results = [h.result(timeout=10) for h in handles]
    attempts = max(h.info().attempts for h in handles)
    print(f"summarized {len(results)} in {took:.1f} s (10/s, burst 2): {report.released}"
          f" release(s) without an attempt spent, at most {attempts} attempt each")  # fmt: skip
    print("flaky:", flaky.result(timeout=10), "after", flaky.info().attempts, "attempt(s)")
    print("tokens left now:", round(model.available()["tokens"]))
    assert took >= 1.2 and all(h.info().attempts == 1 for h in handles)  # 13 past the burst
    assert flaky.info().attempts == 1
    try:
        model.acquire({"tokens": 2000}, wait=0.01)
        model.acquire({"tokens": 2000}, wait=0.01)
    except RateLimited as exc:
        print(f"spent: retry after {exc.retry_after:.2f} s")


if __name__ == "__main__":
    main()
