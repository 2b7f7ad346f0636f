"""Test-only fault-injection switches, all in one place. A real job never sets them; tests set
them in the environment to widen a race window or to make a worker fail on purpose.

* ``EMBEDJOB_DEBUG_ENCODE_DELAY`` (seconds): each encoder actor call sleeps this long first, so a
  test can kill an actor mid-run;
* ``EMBEDJOB_DEBUG_ENCODE_CALLS_DIR`` (a folder): each encoder actor call creates ``<pid>-<n>`` there as
  it starts, so a test can tell which process is mid-call (with the delay above, for a while);
* ``EMBEDJOB_DEBUG_ENCODE_BATCH_DELAY`` (seconds): the encoder sleeps this long after each model
  batch, so a block takes long enough for progress to be seen while it is in flight;
* ``EMBEDJOB_DEBUG_PREPROCESS_DELAY`` (seconds): each preprocess task sleeps this long first, so
  the encoder waits on its input (a feed-bound job: "encoder busy" drops); with
  ``EMBEDJOB_DEBUG_ENCODER_READY_FILE`` (a path) set too, it first waits until an encoder actor is
  ready (the actor creates that file), so the blocks cannot all be done before the actor starts;
* ``EMBEDJOB_DEBUG_ENCODE_OOM_TOKENS`` (tokens): a model batch of more tokens than this raises
  ``torch.OutOfMemoryError`` before its forward, as a GPU without room for it would (the encoder's
  split-and-retry, ``stages/encode/oom.py``); a window longer than this never fits;
* ``EMBEDJOB_DEBUG_ENCODE_INIT_DEATHS`` (``N:folder``): the first N encoder actors to start die
  while they initialise (the process exits, as on a lost node), counted by files in ``folder``;
* ``EMBEDJOB_DEBUG_RAY_FAILURE`` (kind): the driver raises Ray's own exception of that kind where
  Ray would (``ray_errors.py``): ``node-died`` when the encode stream starts, ``startup-timeout``
  and ``register-worker`` from ``ray.init``; ``driver-exit`` (when the encode stream starts) and
  ``driver-exit-init`` (where ``ray.init`` is called) end the driver with ``os._exit(1)``, as Ray's
  C++ core worker does when its raylet is gone (no Python error: ``supervise.py`` reports it);
* ``EMBEDJOB_DEBUG_WORD2VEC_FAIL_RANK`` (rank): that Word2Vec worker raises before training;
* ``EMBEDJOB_DEBUG_WORD2VEC_RANKS_PER_MACHINE`` (n): Word2Vec treats every n consecutive ranks as
  one machine (a multi-node layout on one machine).

Ground floor: imports nothing of embedjob.
"""

from __future__ import annotations

import os
import time
from typing import Optional

ENCODE_DELAY_ENV = "EMBEDJOB_DEBUG_ENCODE_DELAY"
ENCODE_CALLS_DIR_ENV = "EMBEDJOB_DEBUG_ENCODE_CALLS_DIR"
ENCODE_BATCH_DELAY_ENV = "EMBEDJOB_DEBUG_ENCODE_BATCH_DELAY"
PREPROCESS_DELAY_ENV = "EMBEDJOB_DEBUG_PREPROCESS_DELAY"
ENCODER_READY_FILE_ENV = "EMBEDJOB_DEBUG_ENCODER_READY_FILE"
ENCODE_OOM_TOKENS_ENV = "EMBEDJOB_DEBUG_ENCODE_OOM_TOKENS"
ENCODE_INIT_DEATHS_ENV = "EMBEDJOB_DEBUG_ENCODE_INIT_DEATHS"
RAY_FAILURE_ENV = "EMBEDJOB_DEBUG_RAY_FAILURE"
WORD2VEC_FAIL_RANK_ENV = "EMBEDJOB_DEBUG_WORD2VEC_FAIL_RANK"
WORD2VEC_RANKS_PER_MACHINE_ENV = "EMBEDJOB_DEBUG_WORD2VEC_RANKS_PER_MACHINE"


def encode_delay() -> None:
    """Sleep for ``EMBEDJOB_DEBUG_ENCODE_DELAY`` seconds when it is set (encoder actors)."""
    if ENCODE_DELAY_ENV in os.environ:
        time.sleep(float(os.environ[ENCODE_DELAY_ENV]))


def encode_call_started() -> None:
    """Record an encoder call's start in ``EMBEDJOB_DEBUG_ENCODE_CALLS_DIR`` when it is set."""
    folder = os.environ.get(ENCODE_CALLS_DIR_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        n = sum(1 for f in os.listdir(folder) if f.startswith(f"{os.getpid()}-"))
        open(os.path.join(folder, f"{os.getpid()}-{n}"), "a").close()


def encode_batch_delay() -> None:
    """Sleep for ``EMBEDJOB_DEBUG_ENCODE_BATCH_DELAY`` seconds when it is set (after a model batch)."""
    if ENCODE_BATCH_DELAY_ENV in os.environ:
        time.sleep(float(os.environ[ENCODE_BATCH_DELAY_ENV]))


def preprocess_delay() -> None:
    """Sleep for ``EMBEDJOB_DEBUG_PREPROCESS_DELAY`` seconds when it is set (preprocess tasks),
    after an encoder actor is ready when ``EMBEDJOB_DEBUG_ENCODER_READY_FILE`` is set (at most 600 s)."""
    if PREPROCESS_DELAY_ENV in os.environ:
        ready = os.environ.get(ENCODER_READY_FILE_ENV)
        deadline = time.time() + 600
        while ready and not os.path.exists(ready) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(float(os.environ[PREPROCESS_DELAY_ENV]))


def encoder_ready() -> None:
    """An encoder actor is ready: creates ``EMBEDJOB_DEBUG_ENCODER_READY_FILE`` when it is set."""
    path = os.environ.get(ENCODER_READY_FILE_ENV)
    if path:
        open(path, "a").close()


def encode_oom_check(tokens: int) -> None:
    """Raise ``torch.OutOfMemoryError`` for a model batch of more than ``EMBEDJOB_DEBUG_ENCODE_OOM_TOKENS``
    tokens, when it is set (the encoder, before each forward)."""
    limit = os.environ.get(ENCODE_OOM_TOKENS_ENV)
    if limit is not None and tokens > int(limit):
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {tokens} tokens "
                                     f"(injected: {ENCODE_OOM_TOKENS_ENV}={limit})")


def encode_init_death() -> None:
    """Exit this process (an encoder actor initialising) while fewer than N deaths are recorded in the
    folder of ``EMBEDJOB_DEBUG_ENCODE_INIT_DEATHS=N:folder``, when it is set."""
    spec = os.environ.get(ENCODE_INIT_DEATHS_ENV)
    if not spec:
        return
    n, folder = spec.split(":", 1)
    os.makedirs(folder, exist_ok=True)
    if len(os.listdir(folder)) < int(n):
        with open(os.path.join(folder, f"death-{os.getpid()}"), "w") as f:
            f.write(str(time.time()))
        os._exit(1)


def ray_failure(where: str) -> Optional[str]:
    """The kind of Ray failure to raise at ``where`` (``EMBEDJOB_DEBUG_RAY_FAILURE``), if any."""
    kind = os.environ.get(RAY_FAILURE_ENV)
    starts = {"node-died": "stream", "startup-timeout": "init", "register-worker": "init", "driver-exit": "stream",
              "driver-exit-init": "init"}
    return kind if kind and starts.get(kind) == where else None


def word2vec_switches() -> dict[str, Optional[str]]:
    """The Word2Vec switches as set in the driver's environment, for the workers' loop config."""
    return {"fail_rank": os.environ.get(WORD2VEC_FAIL_RANK_ENV),
            "ranks_per_machine": os.environ.get(WORD2VEC_RANKS_PER_MACHINE_ENV)}
