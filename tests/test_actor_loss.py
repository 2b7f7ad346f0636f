"""Encoder actors lost while they start (a spot node reclaimed while it loads the model): each costs
one actor, up to encode.max_actor_init_deaths in a row; a model that can never load still fails
fast, with one line. The deaths are real: the actor's process exits during its __init__
(EMBEDJOB_DEBUG_ENCODE_INIT_DEATHS, debug.py), with encode.max_restarts=0 so that Ray core does not
restart it in place (as when its node is gone) and Ray Data's actor pool replaces it."""

import os

import pyarrow.parquet as pq
import pytest

from embedjob.errors import JobError
from embedjob.pipeline import run_job
from tests.conftest import SAMPLE_TEXTS, write_shards
from tests.helpers import small_job

DEATHS_ENV = "EMBEDJOB_DEBUG_ENCODE_INIT_DEATHS"


def _ray_with_deaths(n: int, folder) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {DEATHS_ENV: f"{n}:{folder}", "HF_HUB_OFFLINE": "1",
                                       "TOKENIZERS_PARALLELISM": "false"}})


@pytest.fixture()
def ray_restore():
    import ray

    yield ray
    ray.shutdown()


def test_actor_death_during_init_is_tolerated(ray_restore, tmp_path, tiny_model):
    ids = write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=2)
    deaths = tmp_path / "deaths"
    _ray_with_deaths(1, deaths)  # the first actor to start dies
    res = run_job(small_job(tmp_path / "in", tmp_path / "out", tiny_model,
                            encode={"actors": 1, "max_restarts": 0}))  # the default budget (3)
    assert res.ok and len(os.listdir(deaths)) == 1
    got = pq.read_table(tmp_path / "out" / "vectors", columns=["id"]).column("id").to_pylist()
    assert sorted(got) == sorted(ids)


@pytest.mark.slow
def test_actor_deaths_beyond_the_budget_fail_with_one_line(ray_restore, tmp_path, tiny_model):
    write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=2)
    deaths = tmp_path / "deaths"
    _ray_with_deaths(2, deaths)  # the first two actors to start die
    for budget in (0, 1):  # Ray Data's own default (0) fails on the first death
        for f in os.listdir(deaths) if deaths.exists() else []:
            os.remove(deaths / f)
        with pytest.raises(JobError, match="encode stage failed") as e:
            run_job(small_job(tmp_path / "in", tmp_path / f"out{budget}", tiny_model,
                              encode={"actors": 1, "max_restarts": 0, "max_actor_init_deaths": budget}))
        assert "\n" not in str(e.value)
        assert len(os.listdir(deaths)) == budget + 1
