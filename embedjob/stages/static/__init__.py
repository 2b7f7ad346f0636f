"""The static stage: BERT static word vectors, aggregated in the encode pass (Bommasani, Davis &
Cardie, ACL 2020).

A word's static vector is the average, over every occurrence of the word in the corpus, of its
contextual vector, where the contextual vector of one occurrence pools the word's word pieces
(``mean`` by default; ``first``, ``last`` or ``max``) from the chosen layer(s) (the last by default;
``last4`` = mean of the last four). Nothing runs a second BERT pass. Words are the job's vocabulary
(the gensim tokens), so the output keys are the same strings as ``tokens/`` and Word2Vec's.

The feature plugs into four stages, one file each, exactly once at three levels (staged parts per
encoder call, one part per committed shard, the corpus-wide merge of committed shards only):

* ``config.py`` — ``StaticConfig`` (the ``static:`` settings), the layer and word-pooling choices,
  ``static_actor_settings`` (what the preprocess tasks and encoder actors get);
* ``align.py`` — preprocessing: ``align_words`` maps BERT word pieces to vocabulary words;
* ``accumulate.py`` — encoding: ``StaticAccumulator`` sums each word's vectors per shard row run
  and writes the staged parts (``_tmp/<shard>/<r0>-<r1>.static.arrow``);
* ``parts.py`` — the part tables and, at shard commit, ``commit_static_parts`` (the staged parts
  that tile the shard -> ``static/parts/<shard>.parquet``);
* ``stage.py`` — ``run_static``: merges the committed shards' parts and writes
  ``static/vectors.bin``, ``vectors.vocab.txt`` and ``vectors.kv`` (via :mod:`embedjob.wordvectors`).

Query words as the job spells them: :func:`embedjob.stages.spelling.normalize_query_word`.

Only the config class is imported here, so that loading a job's config stays cheap.

Example::

    from gensim.models import KeyedVectors
    kv = KeyedVectors.load_word2vec_format("out/static/vectors.bin", binary=True,
                                           fvocab="out/static/vectors.vocab.txt")
    kv.most_similar(normalize_query_word("out", {}, "cats"))
"""

from embedjob.stages.static.config import StaticConfig

__all__ = ["StaticConfig"]
