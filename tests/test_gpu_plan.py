"""The Ray side of the GPU path, on a CPU machine: a local Ray that advertises logical GPUs.

Ray places an actor that asks for ``num_gpus=1`` on a logical GPU whether or not CUDA exists, so
this shows, without a GPU, that the pool plan asks for one GPU per actor and one actor per GPU,
that each actor gets its own GPU id, and that an actor that finds no CUDA fails the job with the
clear line it has (the real GPU run is `.ci/gpu-check` on a GPU host)."""

from __future__ import annotations

import pytest

from embedjob.cluster import plan_encoder
from embedjob.config import build_config
from tests.conftest import SAMPLE_TEXTS, write_shards
from tests.helpers import small_job


@pytest.fixture(scope="module")
def ray_two_gpus():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def test_pool_plan_is_one_actor_per_gpu_each_asking_for_one(ray_two_gpus):
    plan = plan_encoder(build_config({}).encode, ray_two_gpus.cluster_resources(), static=True)
    assert (plan.device, plan.actors, plan.num_gpus) == ("cuda", 2, 1)
    shared = plan_encoder(build_config({"encode": {"actors_per_gpu": 2}}).encode, ray_two_gpus.cluster_resources(),
                          static=True)
    assert (shared.device, shared.actors, shared.num_gpus) == ("cuda", 4, 0.5)


@pytest.mark.parametrize("per_gpu", [1, 2])
def test_actor_without_cuda_fails_the_job_with_one_clear_line(ray_two_gpus, tmp_path, tiny_model, per_gpu):
    # per_gpu=2: Ray places the actors that share a GPU (num_gpus=0.5), each with that GPU's id
    import torch

    from embedjob.errors import JobError
    from embedjob.pipeline import run_job

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-CUDA message cannot be provoked here")
    write_shards(tmp_path / "in", SAMPLE_TEXTS * 2, n_shards=2)
    cfg = small_job(tmp_path / "in", tmp_path / "out", tiny_model,
                    encode={"dtype": "bfloat16", "max_restarts": 0, "max_task_retries": 0, "actors_per_gpu": per_gpu})
    with pytest.raises(JobError) as info:
        run_job(cfg)
    msg = str(info.value)
    assert "placed for a GPU" in msg and "sees no CUDA device" in msg and "encode.device=cpu" in msg
    assert "Ray GPU ids [0]" in msg or "Ray GPU ids [1]" in msg  # Ray gave the actor one GPU of its own
    assert "\n" not in msg.strip()
