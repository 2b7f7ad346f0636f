"""The vocabulary stage without Ray: deterministic ids, counts across shards, and the non-pickle
dictionary.json read back as the same gensim Dictionary."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from embedjob.stages.vocab import build_vocabulary, read_dictionary, run_vocab
from embedjob.storage import Storage


def _tokens(path, docs):
    pq.write_table(pa.table({"id": [str(i) for i in range(len(docs))], "tokens": docs}), path)
    return str(path)


def test_ids_are_most_frequent_first_and_counts_add_up(tmp_path):
    urls = [_tokens(tmp_path / "a.parquet", [["cat", "dog", "cat"], ["dog"]]),
            _tokens(tmp_path / "b.parquet", [["cat", "bird"], []])]
    d = build_vocabulary(urls)
    assert [d[i] for i in range(len(d))] == ["cat", "dog", "bird"]
    assert d.cfs[d.token2id["cat"]] == 3 and d.dfs[d.token2id["cat"]] == 2
    assert d.num_docs == 4 and d.num_pos == 6
    assert build_vocabulary(list(reversed(urls))).token2id == d.token2id  # shard order does not matter


def test_the_stage_writes_what_it_reads_back(tmp_path):
    out = Storage(str(tmp_path / "out"))
    url = _tokens(tmp_path / "a.parquet", [["sun", "moon"], ["sun"]])
    stats = run_vocab(out, [url])
    back = read_dictionary(out)
    assert stats == {"words": 2, "documents": 2, "tokens": 3}
    assert back.token2id == {"sun": 0, "moon": 1} and back.cfs == {0: 2, 1: 1} and back.num_docs == 2
