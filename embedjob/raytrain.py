"""How the Ray Train stages (``word2vec``, ``topics``) run a ``TorchTrainer``."""

from __future__ import annotations

import os
from typing import Optional

# Ray Train's controller checks on its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s), so
# a run is seen to have started and ended up to that much late: seconds lost on every run of a stage.
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_SECONDS = "0.5"


def fit(trainer) -> Optional[BaseException]:
    """Run ``trainer.fit()`` and return its error, None when training succeeded: Ray Train reports a
    failed run either by raising from ``fit()`` (its TrainingFailedError) or in ``Result.error``. The
    controller polls every 0.5 s, unless ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is set (Ray Train
    passes the variable on to the controller it starts)."""
    own_poll = POLL_ENV not in os.environ
    if own_poll:
        os.environ[POLL_ENV] = POLL_SECONDS
    try:
        return getattr(trainer.fit(), "error", None)
    except Exception as e:  # noqa: BLE001 - every failure of the run becomes the caller's stage error
        return e
    finally:
        if own_poll:
            os.environ.pop(POLL_ENV, None)


def root_message(error: BaseException) -> str:
    """The innermost cause's ``Type: message`` (Ray wraps a worker's error several times)."""
    seen = set()
    while True:
        inner = error.__cause__ or error.__context__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(error))
        error = inner
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"
