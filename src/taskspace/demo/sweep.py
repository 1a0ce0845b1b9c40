"""The demo's app: one task that cross-validates a scikit-learn classifier on digits.

Workers load it as ``taskspace.demo.sweep:make_space``; the digits data set
ships inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any

from taskspace import Space, current_task

DEMO_LEASE_S = 3.0
FOLDS = 3

log = logging.getLogger("demo.train")


def _model(params: dict[str, Any]) -> Any:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    kind, hp = params["model"], {k: v for k, v in params.items() if k != "model"}
    if kind == "svc":
        return SVC(**hp)
    if kind == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, **hp))
    if kind == "forest":
        return RandomForestClassifier(random_state=0, **hp)
    if kind == "knn":
        return KNeighborsClassifier(**hp)
    if kind == "tree":
        return DecisionTreeClassifier(random_state=0, **hp)
    return GaussianNB(**hp)


def train(params: dict[str, Any]) -> dict[str, Any]:
    """Cross-validate one configuration; reports progress per fold."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedKFold

    started = time.perf_counter()
    x, y = load_digits(return_X_y=True)
    scores = []
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=0)
    for i, (train_idx, test_idx) in enumerate(folds.split(x, y)):
        model = _model(params).fit(x[train_idx], y[train_idx])
        scores.append(float(model.score(x[test_idx], y[test_idx])))
        log.info("%s fold %d/%d: accuracy %.4f", params["model"], i + 1, FOLDS, scores[-1])
        current_task().progress(i + 1, FOLDS)
    return {
        "params": params,
        "accuracy": sum(scores) / len(scores),
        "pid": os.getpid(),
        "seconds": time.perf_counter() - started,
    }


def make_space(url: str | None = None) -> Space:
    """A Space with the demo's ``train`` task registered."""
    space = Space(url)
    space.task(name="demo.train", max_attempts=3, lease=DEMO_LEASE_S, timeout=120)(train)
    return space


def grid(trials: int, seed: int = 7) -> list[dict[str, Any]]:
    """``trials`` configurations drawn from a fixed grid of six model families."""
    configs: list[dict[str, Any]] = []
    gammas = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2)
    configs += [
        {"model": "svc", "C": c, "gamma": g} for c in (0.1, 1, 10, 100, 1000) for g in gammas
    ]
    configs += [{"model": "logreg", "C": c} for c in (0.001, 0.01, 0.1, 1, 10, 100)]
    configs += [{"model": "forest", "n_estimators": n, "max_depth": d}
                for n in (25, 50, 100) for d in (None, 8, 16)]  # fmt: skip
    configs += [{"model": "knn", "n_neighbors": k, "weights": w}
                for k in (1, 3, 5, 7, 9, 11, 13, 15) for w in ("uniform", "distance")]  # fmt: skip
    configs += [{"model": "tree", "max_depth": d, "criterion": c}
                for d in (4, 8, 12, 16, None) for c in ("gini", "entropy")]  # fmt: skip
    configs += [{"model": "nb", "var_smoothing": v} for v in (1e-9, 1e-7, 1e-5, 1e-3)]
    random.Random(seed).shuffle(configs)
    return [configs[i % len(configs)] for i in range(trials)]
