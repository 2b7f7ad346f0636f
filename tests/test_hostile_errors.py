"""Hostile inputs and models: what `embedjob run` promises when the corpus or the model is not what
it should be. Each failure is ONE line on stderr naming the file, row or id and the cause (never a
Ray traceback); a corpus too small for the static vocabulary is a warning and an empty result,
never a crash; a broken model folder is refused on the driver before Ray starts."""

import json
import os
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data  # noqa: F401 - see below
from transformers.utils import logging as hf_logging

from embedjob.cli import main
from tests.conftest import write_shards
from tests.helpers import small_job_data

# Ray Data and transformers bind their console log handlers to sys.stderr when first set up: done
# here, at collection, not inside a test whose capsys stream is closed once it ends.
hf_logging.get_logger("transformers")

ANSI = re.compile(r"\x1b\[")
# Ray's own log lines on the driver's stderr during any run ("2026-01-01 10:00:00,123\tINFO file.py:1 -- ...")
RAY_LOG_LINE = re.compile(r"^(\[?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+.*(INFO|WARNING|\sI\s)|\S+\.py:\d+: \w*Warning|  ds = )")


def _spec(tmp_path, inp, model, **sections):
    data = small_job_data(inp, tmp_path / "out", model, ray={"num_cpus": 2}, **sections)
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


def _one_error_line(err: str, *needles: str) -> str:
    """The single `embedjob: error:` line of ``err``; no other line of embedjob's or a traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not RAY_LOG_LINE.match(ln)]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("embedjob: error: "), err
    assert "Traceback" not in err and not ANSI.search(err), err
    for n in needles:
        assert n in line, (n, line)
    return line


# -- defect 5: no word reaches static.min_count ------------------------------------------------
WORDS = ("apple banana cherry delta eagle falcon garden harbor island jungle kettle lemon meadow "
         "nectar orchard pepper quartz river saddle timber umbrella valley walnut yellow zebra").split()


def test_static_with_no_word_at_min_count_warns_and_writes_an_empty_result(ray_local, tmp_path, tiny_model,
                                                                            capsys, caplog):
    """20 short documents, no word seen static.min_count=5 times: exit 0, a manifest, a warning,
    `words: 0` with the reason in the stats, empty vector files, and the words index skipped."""
    texts = [f"{WORDS[i % len(WORDS)]} {WORDS[(i + 7) % len(WORDS)]}" for i in range(20)]
    write_shards(tmp_path / "in", texts, n_shards=2)
    spec = _spec(tmp_path, tmp_path / "in", tiny_model, static={"enabled": True, "min_count": 5},
                 index={"enabled": True})
    assert main(["run", spec]) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    static = manifest["stages"]["static"]
    assert static["words"] == 0 and static["words_seen"] > 0 and "static.min_count=5" in static["empty_reason"]
    assert any("no word vectors" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert manifest["stages"]["index"]["words_skipped"] == {"bert": "no words"}

    from gensim.models import KeyedVectors

    assert len(KeyedVectors.load(str(tmp_path / "out" / "static" / "vectors.kv"))) == 0
    assert len(KeyedVectors.load_word2vec_format(str(tmp_path / "out" / "static" / "vectors.bin"), binary=True)) == 0


def test_similar_on_an_empty_static_output_says_there_are_no_vectors(ray_local, tmp_path, tiny_model, capsys):
    """An all-null text column: exit 0 with a manifest; `embedjob similar` then says in one line that
    the vectors hold no words, and why (no word occurred at all)."""
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": pa.array([None, None, None], pa.string())}),
                   tmp_path / "in" / "p.parquet")
    spec = _spec(tmp_path, tmp_path / "in", tiny_model, static={"enabled": True})
    assert main(["run", spec]) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stages"]["static"]["words"] == 0 and manifest["totals"]["done"] == 1
    capsys.readouterr()
    assert main(["similar", str(tmp_path / "out"), "--word", "cat"]) == 2
    _one_error_line(capsys.readouterr().err, "hold no words", "no word of the job's vocabulary occurred")


def test_topics_on_empty_bert_vectors_is_a_clear_error(tmp_path):
    """topics.embeddings='bert' over static vectors with no words: a TopicsError saying so, not
    'none of the vocabulary's words is in the given vectors'."""
    import numpy as np

    from embedjob.errors import TopicsError
    from embedjob.stages.static.stage import build_keyed_vectors
    from embedjob.stages.topics import TopicsConfig
    from embedjob.stages.topics.embeddings import resolve_embeddings
    from embedjob.storage import Storage
    from embedjob.wordvectors import write_keyed_vectors

    out = Storage(str(tmp_path))
    write_keyed_vectors(build_keyed_vectors([], np.zeros(0, np.int64), np.zeros((0, 8), np.float32)),
                        out.child("static"))
    with pytest.raises(TopicsError, match="holds no word vectors"):
        resolve_embeddings(TopicsConfig(model="etm", embeddings="bert"), out, ["cat"])


# -- defect 6: errors raised inside Ray tasks keep their message ---------------------------------
def test_empty_text_under_fail_names_the_shard_row_and_id(ray_local, tmp_path, tiny_model, capsys):
    """input.on_empty_text=fail: exit 2 and one stderr line naming the shard's file, the row and
    the document id (not Ray's 'UDF failed to process a data block')."""
    texts = ["a cat sat", "dogs bark", "the market fell", "rain again", "frogs sing", "   "]
    write_shards(tmp_path / "in", texts, n_shards=2)  # doc-00005 is row 2 of part-00001
    spec = _spec(tmp_path, tmp_path / "in", tiny_model, input={"on_empty_text": "fail"})
    assert main(["run", spec]) == 2
    line = _one_error_line(capsys.readouterr().err, "part-00001.parquet", "row 2", "doc-00005", "on_empty_text")
    assert "UDF failed" not in line


def test_invalid_utf8_text_names_the_shard_row_id_and_byte(ray_local, tmp_path, tiny_model, capsys):
    """A string column holding invalid UTF-8 (Parquet does not check): exit 2 and one line naming
    the file, the row, the id and the byte offset in the document."""
    (tmp_path / "in").mkdir()
    text = pa.array([b"fine text", b"ok \xff\xfe bad", b"more"], pa.binary()).cast(pa.string(), safe=False)
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": text}), tmp_path / "in" / "p.parquet")
    assert main(["run", _spec(tmp_path, tmp_path / "in", tiny_model)]) == 2
    _one_error_line(capsys.readouterr().err, "p.parquet", "row 1", "'b'", "UTF-8", "byte 3")


def _corrupt_column_chunk(path, column: int):
    """Overwrite the middle of one column chunk's pages, leaving the footer (the launch check) valid."""
    import pyarrow.parquet as pq

    chunk = pq.ParquetFile(path).metadata.row_group(0).column(column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    size = chunk.total_compressed_size
    data = bytearray(path.read_bytes())
    for i in range(start + size // 4, start + 3 * size // 4):
        data[i] = 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("column,needle", [(0, "cannot read the id column"), (1, "cannot read Parquet shard")],
                         ids=["id-page-found-at-launch", "text-page-found-in-a-ray-task"])
def test_corrupt_data_page_under_fail_is_one_line_without_colour_codes(ray_local, tmp_path, tiny_model, capsys,
                                                                       column, needle):
    """A corrupt data page under input.on_bad_shard=fail: exit 2 and one line naming the file, with
    no terminal colour codes and no Ray traceback (an id page is found by the launch check, a text
    page by the read task)."""
    write_shards(tmp_path / "in", [f"document number {i} about cats" for i in range(60)], n_shards=3)
    _corrupt_column_chunk(tmp_path / "in" / "part-00001.parquet", column)
    assert main(["run", _spec(tmp_path, tmp_path / "in", tiny_model)]) == 2
    _one_error_line(capsys.readouterr().err, "part-00001.parquet", needle)


def test_cli_prints_a_multi_line_user_error_as_one_line(monkeypatch, capsys):
    """Whatever a user error's message holds (newlines, colour codes, Ray's retry advice), the CLI
    prints one line."""
    import embedjob.cli as cli
    from embedjob.pipeline import JobError

    def boom(args):
        raise JobError("encode stage failed: \x1b[36mray::Map()\x1b[39m bad thing\nsecond line\n"
                       "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\n"
                       "To change retry attempts, backoff, or which errors are retried, configure it")

    monkeypatch.setattr(cli, "cmd_config", boom)
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert err == "embedjob: error: encode stage failed: ray::Map() bad thing; second line\n"


def test_root_cause_unwraps_ray_task_errors():
    """RayTaskError(InputError) -> the InputError with Ray's retry advice cut from its message; Ray
    Data's UserCodeException whose original was lost -> the original's 'Type: message' from the
    worker's traceback text; Ray Train's WorkerGroupError -> the worker's error."""
    from ray.exceptions import RayTaskError, UserCodeException

    from embedjob.errors import RemoteError, root_cause
    from embedjob.raytrain import root_message
    from embedjob.stages.read import InputError

    orig = InputError("cannot read Parquet shard s3://b/p.parquet (at row 0): bad page\n"
                      "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).")
    wrapped = RayTaskError("map", "\x1b[36mray::Map()\x1b[39m\n  File x\n", orig).as_instanceof_cause()
    assert isinstance(wrapped, InputError)
    cause = root_cause(wrapped)
    assert cause is orig and str(cause) == "cannot read Parquet shard s3://b/p.parquet (at row 0): bad page"

    tb = ("\x1b[36mray::Map()\x1b[39m (pid=1)\n  File \"/x/preprocess.py\", line 3, in f\n    raise X\n"
          "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 3: invalid start byte\n\n"
          "The above exception was the direct cause of the following exception:\n\n"
          "ray.exceptions.UserCodeException: UDF failed to process a data block.\n")
    lost = RayTaskError("map", tb, UserCodeException("UDF failed to process a data block."))
    cause = root_cause(lost)
    assert isinstance(cause, RemoteError)
    assert str(cause) == "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 3: invalid start byte"

    from ray.train import WorkerGroupError

    group = WorkerGroupError("rank 1 failed:\nTraceback...", {1: ValueError("failure injected")})
    assert root_message(group) == "ValueError: failure injected"


# -- defect 7: a broken model folder is refused before Ray starts --------------------------------
@pytest.fixture()
def no_ray(monkeypatch):
    """Fails the test if the job gets as far as starting or joining Ray."""
    import embedjob.pipeline as pipeline

    def init_ray(cfg):
        raise AssertionError("Ray was started for a job whose model folder is broken")

    monkeypatch.setattr(pipeline, "init_ray", init_ray)


def _model_copy(tiny_model, tmp_path, change):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    change(folder)
    return str(folder)


def _drop_model_type(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["model_type"]
    (folder / "config.json").write_text(json.dumps(cfg))


def _drop_tokenizer(folder):
    for name in os.listdir(folder):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            os.remove(folder / name)


def _drop_weights(folder):
    os.remove(folder / "model.safetensors")


def _truncate_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("change, needle", [
    (_drop_model_type, "no 'model_type'"),
    (_drop_tokenizer, "tokenizer has no vocabulary"),
    (_drop_weights, "no model weights"),
    (_truncate_weights, "model.safetensors is not a readable safetensors file"),
], ids=["no-model_type", "no-tokenizer", "no-weights", "truncated-weights"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_broken_model_folder_fails_before_ray(tmp_path, tiny_model, capsys, no_ray, change, needle, dry_run):
    """config.json without model_type, no tokenizer files, no weights, or truncated weights: exit 2
    with one line naming encode.model, the folder and what is wrong, before Ray starts (and before
    --dry-run prints anything)."""
    write_shards(tmp_path / "in", ["a cat", "a dog"], n_shards=1)
    model = _model_copy(tiny_model, tmp_path, change)
    assert main(["run", _spec(tmp_path, tmp_path / "in", model)] + (["--dry-run"] if dry_run else [])) == 2
    out, err = capsys.readouterr()
    _one_error_line(err, f"encode.model={model!r}", needle)
    assert out == ""


def test_pickled_weights_are_accepted_as_transformers_loads_them_weights_only(tmp_path, tiny_model):
    """A pytorch_model.bin-only folder passes: transformers 5 loads it with torch.load(weights_only=True);
    one that pickles more than tensors is refused with how to convert it to safetensors."""
    import torch
    from safetensors.torch import load_file

    from embedjob.models import ModelError, check_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    state = load_file(str(folder / "model.safetensors"))
    os.remove(folder / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    assert check_model(str(folder)) == str(folder)
    torch.save({"weights": state, "hook": pytest.approx}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"weights_only=True.*convert it to model.safetensors"):
        check_model(str(folder))
