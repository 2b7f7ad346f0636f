"""Word2Vec / FastText trained data-parallel with Ray Train, gensim inside (``<out>/word2vec/``).

What lives where:

* ``config.py`` — :class:`Word2VecConfig`, the ``word2vec:`` section of the job config;
* ``stage.py`` — driver side: :func:`train_word2vec` (runs the Ray Train job) and
  :func:`run_word2vec` (the pipeline stage); the overview of the whole scheme is its docstring;
* ``model.py`` — the gensim model: vocabulary and initial weights, the trainable matrices,
  the rows a segment can change, the start from ``init_from``;
* ``segments.py`` — a worker's slice of the corpus cut into sync segments (LineSentence files);
* ``shared_memory.py`` — one model per machine, shared by its workers through mapped files;
* ``sync.py`` — the ``all_reduce`` syncs that combine the models of different machines;
* ``worker.py`` — ``train_loop_per_worker``, one Ray Train worker, phase by phase (and the
  test-only fault-injection switches);
* ``report.py`` — what rank 0 writes: the vectors and ``report.json``.
"""

from embedjob.stages.word2vec.config import Word2VecConfig

__all__ = ["Word2VecConfig"]
