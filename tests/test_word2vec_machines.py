"""Word2Vec workers on several machines (issues 5 and 10): each machine's workers share one model in
memory, and the machines' models are combined at every sync.

One machine stands in for two: ``EMBEDJOB_DEBUG_WORD2VEC_RANKS_PER_MACHINE=2`` makes ranks 0-1 and 2-3
two "machines", so 4 Ray Train workers (a Ray of its own with 4 logical CPUs) run the multi-machine
path: two shared models, synced by their first workers.
"""

from __future__ import annotations

import numpy as np
import pytest

from embedjob.debug import WORD2VEC_RANKS_PER_MACHINE_ENV as MACHINE_SIZE_ENV
from embedjob.stages.word2vec.stage import train_word2vec
from tests.test_word2vec import (
    group_margin,
    group_of,
    small_cfg,
    synthetic_docs,
    write_token_shards,
)


@pytest.fixture(scope="module")
def ray_four():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# slow: the default suite keeps under 30 min on CI's 2 cores; test_word2vec covers two workers and FastText on one machine
@pytest.mark.slow
def test_two_machines_of_two_workers_fasttext(ray_four, tmp_path, monkeypatch):
    monkeypatch.setenv(MACHINE_SIZE_ENV, "2")
    urls = write_token_shards(tmp_path, synthetic_docs())
    # the n-gram matrix crosses machines at every 3rd sync (and the last) only
    cfg = small_cfg(model="fasttext", workers=4, sync_every=0.25, ngram_sync_every=3)
    kv, report = train_word2vec(urls, cfg, {})
    assert report["shared_memory_groups"] == [2, 2] and report["syncs_per_epoch"] == 4
    assert 0.0 < report["synced_row_fraction"] < 1.0  # n-gram rows skipped at 2 of every 3 syncs
    assert report["documents"] == sum(1 for d in synthetic_docs() if d)
    assert group_margin(kv) > 0.2
    unseen = "quartzkx"
    assert unseen not in kv.key_to_index and np.linalg.norm(kv[unseen]) > 0
    near = [w for w, _ in kv.most_similar(unseen, topn=5)]
    assert sum(group_of(w) == "quartz" for w in near) >= 3, near
