"""A corpus whose text column is entirely null (input.on_empty_text: keep): the job finishes with exit
0, and each corpus-wide stage with nothing to work on says so in one line and is recorded in the
manifest as skipped, with the reason (issue 30, part 2, defect 2: the index stage failed the job with
exit 2, "hold no non-null vector", after everything was encoded and written)."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from embedjob.cli import main
from tests.helpers import small_job_data


def test_all_null_texts_finish_with_the_corpus_stages_skipped(ray_local, tmp_path, tiny_model, capsys, caplog):
    (tmp_path / "in").mkdir()
    for s in range(2):
        pq.write_table(pa.table({"id": [f"d{s}-{i}" for i in range(4)], "text": pa.array([None] * 4, pa.string())}),
                       tmp_path / "in" / f"part-{s:05d}.parquet")
    data = small_job_data(tmp_path / "in", tmp_path / "out", tiny_model, ray={"num_cpus": 2},
                          input={"on_empty_text": "keep"}, static={"enabled": True},
                          word2vec={"enabled": True, "workers": 1}, topics={"enabled": True},
                          index={"enabled": True})
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="embedjob"):
        assert main(["run", str(spec)]) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["totals"]["rows_out"] == 8
    stages = manifest["stages"]
    assert stages["index"]["status"] == "skipped" and "nothing to index" in stages["index"]["reason"]
    for name in ("word2vec", "topics"):
        assert stages[name]["status"] == "skipped" and "hold no token" in stages[name]["reason"], name
    assert stages["static"]["words"] == 0  # done, with empty vector files and its own warning
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("index: skipped")]
    assert lines == ["index: skipped: nothing to index: the 2 vector shard(s) hold no non-null vector "
                     "(every text empty or null)"]
    assert not (tmp_path / "out" / "index" / "docs.faiss").exists()
