"""Helpers shared by the test modules (fixtures stay in conftest.py)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import pytest

from embedjob.config import JobConfig, build_config
from tests.conftest import ONLY_SHARD_STAGES


def small_job_data(inp, out, model, **sections: dict[str, Any]) -> dict[str, Any]:
    """A job spec (as a dict) for a few small shards: per-shard stages only, float32, blocks of 16
    rows; ``sections`` update it (``encode={"pooling": "cls"}``...)."""
    data: dict[str, Any] = {"input": {"url": str(inp), "rows_per_block": 16}, "output": {"url": str(out)},
                            **{k: dict(v) for k, v in ONLY_SHARD_STAGES.items()},
                            "encode": {"model": model, "dtype": "float32", "rows_per_call": 16}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return data


def small_job(inp, out, model, **sections: dict[str, Any]) -> JobConfig:
    """:func:`small_job_data`, validated."""
    return build_config(small_job_data(inp, out, model, **sections))


def ray_with_batch_delay(seconds: float):
    """A fresh local Ray whose encoder sleeps ``seconds`` after each model batch (a block lasts
    seconds), for a fixture to yield; shut down after."""
    import ray

    from embedjob.debug import ENCODE_BATCH_DELAY_ENV

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {ENCODE_BATCH_DELAY_ENV: str(seconds), "HF_HUB_OFFLINE": "1",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    try:
        yield ray
    finally:
        ray.shutdown()


def kill_driver_when(proc, ready: Callable[[], bool], timeout: float = 240) -> None:
    """SIGKILL the job ``proc`` (started with ``start_new_session=True``: the driver and the local Ray it
    started) once ``ready()``; fails the test if the job ends first."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and not ready():
            if proc.poll() is not None:
                pytest.fail("job ended before it could be killed: " + proc.stderr.read().decode()[-2000:])
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
