"""GPU out-of-memory in the encoder, on CPU: an allocator failure injected before every model batch
of more than EMBEDJOB_DEBUG_ENCODE_OOM_TOKENS tokens (debug.py) is split and retried at half the
budget, the lowered budget is kept and recorded, and a document that never fits is reported by id
and fails only its shard."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob.errors import InputError
from embedjob.pipeline import run_job
from embedjob.stages.encode import EncodeConfig, TextEncoder
from embedjob.stages.encode.oom import DocumentTooLarge, is_allocator_failure
from tests.conftest import SAMPLE_TEXTS, write_shards
from tests.helpers import small_job

OOM_ENV = "EMBEDJOB_DEBUG_ENCODE_OOM_TOKENS"
LONG = " ".join(["the long document goes on and on"] * 12)  # ~85 tokens: never fits under 64


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return TextEncoder.from_config(EncodeConfig(model=tiny_model, dtype="float32", batch_tokens=2048))


def test_allocator_failures_are_recognised():
    import torch

    assert is_allocator_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_allocator_failure(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert is_allocator_failure(RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: can't "
                                             "allocate memory: you tried to allocate 123 bytes"))
    assert not is_allocator_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_oom_batch_is_split_budget_kept_and_vectors_unchanged(encoder, monkeypatch):
    texts = [f"{t} number {i}" for i in range(6) for t in SAMPLE_TEXTS]  # 72 short documents
    encoder.batch_tokens = 2048
    clean = encoder.encode_texts(texts).vectors
    assert encoder.oom.ooms == 0
    monkeypatch.setenv(OOM_ENV, "300")
    got = encoder.encode_texts(texts).vectors
    np.testing.assert_allclose(got, clean, atol=1e-5)
    figures = encoder.oom.as_dict()
    assert figures["ooms"] > 0 and figures["retried_batches"] >= 2
    assert figures["configured_batch_tokens"] == 2048 and 64 <= figures["batch_tokens"] <= 300
    kept = figures["batch_tokens"]
    ooms = figures["ooms"]
    encoder.encode_texts(texts)  # the lowered budget is kept: no new out-of-memory
    assert encoder.oom.ooms == ooms and encoder.batch_tokens == kept


def test_document_that_never_fits_is_named(encoder, monkeypatch):
    encoder.batch_tokens = 2048
    monkeypatch.setenv(OOM_ENV, "64")
    with pytest.raises(DocumentTooLarge) as e:
        encoder.encode_texts(SAMPLE_TEXTS[:3] + [LONG] + SAMPLE_TEXTS[3:6])
    assert e.value.doc == 3 and "does not fit" in str(e.value)


@pytest.fixture(scope="module")
def ray_oom(tiny_model):
    """Local Ray whose encoder actors fail to allocate any model batch over 64 tokens."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {OOM_ENV: "64", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def test_unfit_document_fails_its_shard_only_and_budget_is_recorded(ray_oom, tmp_path, tiny_model):
    texts = [f"{t} item {i}" for i in range(4) for t in SAMPLE_TEXTS]  # 48 documents
    texts[7] = LONG  # doc-00007: shard 1 of 3
    ids = write_shards(tmp_path / "in", texts, n_shards=3)
    job = dict(input={"on_bad_shard": "skip"}, encode={"actors": 1, "batch_tokens": 1024})
    res = run_job(small_job(tmp_path / "in", tmp_path / "out", tiny_model, **job))
    assert res.failed_shards == ["part-00001"]
    reason = res.manifest["shards"]["part-00001"]["reason"]
    assert "doc-00007" in reason and "does not fit" in reason, reason
    oom = res.manifest["stages"]["encode"]["oom"]
    assert oom["ooms"] > 0 and oom["unfit_documents"] >= 1
    assert oom["configured_batch_tokens"] == 1024 and oom["batch_tokens"] <= 64
    got = pq.read_table(tmp_path / "out" / "vectors", columns=["id"]).column("id").to_pylist()
    assert sorted(got) == sorted(i for k, i in enumerate(ids) if k % 3 != 1)  # the other shards, every row once
    stats = json.loads((tmp_path / "out" / "stats" / "encode.json").read_text())
    assert stats["oom"]["batch_tokens"] == oom["batch_tokens"]
    report = (tmp_path / "out" / "report.html").read_text()
    assert "out of memory: batches split / token budget" in report and f"1024 -&gt; {oom['batch_tokens']}" in report
    # under on_bad_shard=fail the same document stops the job, named by shard, row and id
    with pytest.raises(InputError, match=r"part-00001.*doc-00007.*does not fit"):
        run_job(small_job(tmp_path / "in", tmp_path / "out2", tiny_model, encode={"actors": 1}))
