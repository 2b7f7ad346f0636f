"""How the Ray Train stages (``word2vec``, ``topics``) run a ``TorchTrainer``."""

from __future__ import annotations

import os
from typing import Optional

from embedjob.errors import RemoteError, one_line, root_cause

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
    """The root cause's ``Type: message`` on one line: Ray Train wraps a worker's error in
    ``WorkerGroupError`` (``worker_failures``), ``UserExceptionWithTraceback`` and Ray's task errors,
    whose text is a whole traceback (see :mod:`embedjob.errors`)."""
    cause = root_cause(error)
    if isinstance(cause, RemoteError):
        return str(cause)
    return f"{type(cause).__name__}: {one_line(str(cause))}"
