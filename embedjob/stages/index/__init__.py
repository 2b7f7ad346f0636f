"""The index stage: FAISS indices over a job's document vectors and word vectors, and ``embedjob search``.

What lives where:

* ``config.py`` — ``IndexConfig`` (the ``index:`` settings) and the pure recipe arithmetic:
  kind and metric choice, clusters, sub-quantizers, factory string, index file names;
* ``faiss_index.py`` — FAISS objects from the recipe: new, trained, re-ranked, query parameters;
* ``shards.py`` — reading ``vectors/<shard>.parquet`` in Ray tasks: ids, rows, vectors, samples,
  per-shard adds to a trained IVF index;
* ``build.py`` — building in memory: the document index, word indices, any matrix (``BuiltIndex``);
* ``stage.py`` — ``run_index``: builds every index, then writes them to ``<output>/index/``;
* ``search.py`` — reading a finished index back and answering queries (``search``, ``Searcher``,
  ``similar_words_in_index``, ``search_report`` for ``embedjob search``).

Only the config class is imported here, so that loading a job's config stays cheap.
"""

from embedjob.stages.index.config import IndexConfig

__all__ = ["IndexConfig"]
