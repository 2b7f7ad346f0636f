"""Shared fixtures: a real local Ray per module, a real S3 endpoint (moto's server on 127.0.0.1),
tiny corpora and a tiny random BERT model."""

from __future__ import annotations

import os
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_CORPUS = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "corpus", "mixed-en")
)

# Job-spec sections that switch the corpus-wide model stages off, for tests of the per-shard stages.
ONLY_SHARD_STAGES = {k: {"enabled": False} for k in ("static", "word2vec", "topics", "index")}

SAMPLE_TEXTS = [
    "The cat sat on the mat and looked at the dog.",
    "Dogs and cats are common household pets in many countries.",
    "The stock market fell sharply on Tuesday after the bank raised interest rates.",
    "Investors worried about inflation sold shares of technology companies.",
    "The football team won the championship after a dramatic final match.",
    "Rain is expected across the north of the country over the weekend.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The government announced new funding for public hospitals and schools.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "Parliament debated the new tax law late into the night.",
    "Heavy storms caused flooding in several coastal towns.",
    "The orchestra played a symphony by Beethoven to a full concert hall.",
]


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with 2 CPUs, shared by the tests of one module."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server over HTTP on 127.0.0.1; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket on the moto server; yields (bucket name, storage_options)."""
    import boto3

    name = "embedjob-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=name)
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    yield name, opts


def write_shards(folder, texts, *, n_shards=3, id_prefix="doc", extra_columns=None):
    """Write ``texts`` round-robin into ``n_shards`` Parquet files under ``folder``; returns ids."""
    os.makedirs(folder, exist_ok=True)
    ids = [f"{id_prefix}-{i:05d}" for i in range(len(texts))]
    for s in range(n_shards):
        rows = list(range(s, len(texts), n_shards))
        cols = {"id": [ids[i] for i in rows], "text": [texts[i] for i in rows]}
        for k, v in (extra_columns or {}).items():
            cols[k] = [v[i] for i in rows]
        pq.write_table(pa.table(cols), os.path.join(folder, f"part-{s:05d}.parquet"))
    return ids


@pytest.fixture(scope="session")
def minilm_path():
    from embedjob.models import resolve_model_path

    return resolve_model_path("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, minilm_path):
    """A tiny random BERT (2 layers, 32 dims) with MiniLM's real tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, minilm_path):
    """Tiny random-weight models of many architectures and pipelines, saved with sentence-transformers
    and built on first use (tests/models_zoo.py)."""
    from tests.models_zoo import Zoo

    return Zoo(str(tmp_path_factory.mktemp("zoo")), minilm_path)
