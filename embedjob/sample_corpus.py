"""The default job's corpus: real text that ships inside gensim's test data, no network needed.

* the Lee news corpus (``lee_background.cor``, ``lee.cor``): 350 short news articles;
* the Wikipedia sample (``enwiki-latest-pages-articles1...-shortened.bz2``): ~100 articles, split
  into paragraph chunks of at most ``max_words`` words so documents look like a real backfill's.

Written as a few Parquet shards with ``id``, ``text`` and ``source`` columns::

    build_sample_corpus("data/gensim-corpus")
"""

from __future__ import annotations

import bz2
import logging
import re
from typing import Any

import pyarrow as pa

from embedjob.storage import Storage, StorageError, list_shards

logger = logging.getLogger(__name__)

WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _lee_docs() -> list[dict[str, str]]:
    from gensim.test.utils import datapath

    docs = []
    for name in ("lee_background.cor", "lee.cor"):
        with open(datapath(name), encoding="latin-1") as f:
            for i, line in enumerate(f):
                line = line.strip()
                if line:
                    docs.append({"id": f"lee-{name.split('.')[0]}-{i:04d}", "text": line, "source": "lee"})
    return docs


def _wiki_docs(max_words: int, max_docs: int) -> list[dict[str, str]]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    docs: list[dict[str, str]] = []
    with bz2.open(datapath(WIKI_SAMPLE)) as f:
        for title, text, pageid in extract_pages(f):
            plain = filter_wiki(text)
            paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", plain)]
            chunk: list[str] = []
            n = 0
            for para in paragraphs:
                words = para.split()
                if len(words) < 8 or para.startswith(("|", "{", "!")):
                    continue
                chunk.extend(words)
                if len(chunk) >= max_words // 2:
                    docs.append({"id": f"wiki-{pageid}-{n:03d}", "text": f"{title}. " + " ".join(chunk[:max_words]),
                                 "source": "enwiki"})
                    chunk, n = [], n + 1
            if len(chunk) >= 20:
                docs.append({"id": f"wiki-{pageid}-{n:03d}", "text": f"{title}. " + " ".join(chunk[:max_words]),
                             "source": "enwiki"})
            if len(docs) >= max_docs:
                break
    return docs[:max_docs]


def build_sample_corpus(url: str, storage_options: dict[str, Any] | None = None, *, shards: int = 4,
                        max_words: int = 200, max_wiki_docs: int = 600) -> list[str]:
    """Write the sample corpus as ``shards`` Parquet files at ``url``; returns their names."""
    docs = _lee_docs() + _wiki_docs(max_words, max_wiki_docs)
    store = Storage(url, storage_options or {})
    names = []
    for s in range(shards):
        part = docs[s::shards]
        table = pa.table({k: [d[k] for d in part] for k in ("id", "text", "source")})
        name = f"part-{s:05d}.parquet"
        store.write_parquet(name, table, row_group_size=256)
        names.append(name)
    logger.info("sample corpus: %d documents (%d Lee news, %d Wikipedia chunks) in %d shards at %s",
                len(docs), sum(d["source"] == "lee" for d in docs), sum(d["source"] == "enwiki" for d in docs),
                shards, store.url())
    return names


def sample_if_missing(url: str, storage_options: dict[str, Any], *, dry_run: bool = False) -> bool:
    """``input.create_sample_if_missing``: whether ``url`` held no Parquet shards; then the sample
    corpus is built there (not on a dry run, which only says so)."""
    try:
        list_shards(url, storage_options)
        return False
    except StorageError:
        pass
    if not dry_run:
        logger.info("input %s holds no shards: building the sample corpus there (input.create_sample_if_missing)",
                    url)
        build_sample_corpus(url, storage_options)
    return True
