"""The job with input and output on S3: moto's real server on 127.0.0.1 over HTTP, via s3fs."""

import io

import pyarrow as pa
import pyarrow.parquet as pq

from embedjob.config import build_config
from embedjob.pipeline import run_job
from embedjob.storage import Storage
from tests.conftest import SAMPLE_TEXTS


def test_job_on_s3(ray_local, s3_bucket, tiny_model):
    bucket, opts = s3_bucket
    store = Storage(f"s3://{bucket}", opts)
    ids = [f"d{i}" for i in range(len(SAMPLE_TEXTS))]
    for s in range(2):
        store.write_parquet(f"in/part-{s}.parquet", pa.table({"id": ids[s::2], "text": SAMPLE_TEXTS[s::2]}))
    cfg = build_config({
        "input": {"url": f"s3://{bucket}/in", "storage_options": opts},
        "output": {"url": f"s3://{bucket}/out", "storage_options": opts},
        "encode": {"model": tiny_model, "dtype": "float32"},
        "static": {"enabled": False}, "topics": {"enabled": False},
    })
    res = run_job(cfg)
    assert res.ok and res.manifest["totals"]["rows_out"] == len(SAMPLE_TEXTS)
    names = store.list("out/vectors")
    assert names == ["part-0.parquet", "part-1.parquet"]
    got = []
    for n in names:
        got += pq.read_table(io.BytesIO(store.read_bytes(f"out/vectors/{n}"))).column("id").to_pylist()
    assert sorted(got) == sorted(ids)
    assert store.read_json("out/manifest.json")["input"]["shards"] == {
        "part-0": f"s3://{bucket}/in/part-0.parquet", "part-1": f"s3://{bucket}/in/part-1.parquet"}
    assert "testing" not in store.read_text("out/manifest.json")  # no secrets in the manifest
