"""The topic model stage: the Embedded Topic Model (Dieng, Ruiz & Blei, TACL 2020) and
ProdLDA (Srivastava & Sutton, 2017) in torch, trained data-parallel with Ray Train.

Pipeline of ``run_topics`` (``stage.py``):

1. bag of words: the job's corpus-wide gensim ``Dictionary`` (``vocab/dictionary.json``) after
   ``filter_extremes``; each token shard becomes rows ``(word_ids, counts)`` in Ray tasks that run
   while Ray Train starts its workers (``cache_bow``, the default), or in a globally shuffled Ray
   Data pass (``cache_bow: false``);
2. training: ``TorchTrainer`` (DDP; gloo on CPU, NCCL on GPUs; by default one worker per node or
   per GPU): each worker takes a ``1/N`` slice of every shard's BoW rows from the object store and
   reshuffles it in memory every epoch, or (``cache_bow: false``) streams its split of the Ray Data
   dataset; rank 0 writes a checkpoint to ``topics/checkpoints/`` through the job's storage every
   ``checkpoint_every`` epochs, and ``resume`` continues from the latest matching one;
3. outputs: ``topics/topics.json`` (top words), ``topics/topic_word.npy`` (K x V), the
   document-topic proportions ``topics/theta/<shard>.parquet`` (``id``, ``theta``) computed by a
   Ray Data pass over all token shards, ``topics/metrics.json`` (NPMI and C_V coherence with
   gensim's ``CoherenceModel`` against the job's own tokens, topic diversity, redundancy, label
   NMI / ARI with ``label_column``, a ``warning`` when topics repeat each other) and
   ``topics/model.pt`` (a plain dict: state dict, model arguments, vocabulary — read it with
   ``torch.load(weights_only=True)``).

The model and the batch transforms are plain functions/classes testable without Ray; theta for
new documents::

    from embedjob.stages.topics.model import load_topic_model

    trained = load_topic_model("output/local")          # reads topics/model.pt
    theta = trained.infer_tokens([["cat", "dog"], ["bank", "rate"]])   # (2, K), rows sum to 1

What makes CPU training of a 20k-word vocabulary quick: with pre-fitted rho the ETM encoder reads
the document's mean word embedding (``EmbeddingBag`` over rho) instead of the V-dimensional bag of
words, so it has E x hidden weights rather than V x hidden (and DDP all-reduces that little); the
``bow`` encoder is an ``EmbeddingBag`` over the normalised bag of words (nnz x hidden, not
V x hidden); the reconstruction term is evaluated only at the non-zero (document, word) pairs,
normalising the K x V logits once per step; each worker keeps its BoW rows in memory; the BoW is
built while the workers start.

Top words (``topics.json``, coherence, diversity) are chosen by LDAvis relevance
(``ranking_lambda``); the full topic-word matrix is in ``topic_word.npy``.

What lives where:

* ``config.py`` — ``TopicsConfig`` (the ``topics:`` settings and their validators), the model
  arguments and encoder input they resolve to;
* ``bow.py`` — the filtered dictionary, bags of words, the BoW of the token shards in Ray tasks
  (sliced per worker) or as a shuffled Ray Dataset;
* ``model.py`` — ``TopicModel`` (torch), BoW batches as tensors, initialisation, theta inference,
  ``model.pt`` written and read back (``load_topic_model``, ``TrainedTopicModel``);
* ``embeddings.py`` — rho from the job's or a given vector file (``resolve_embeddings``);
* ``metrics.py`` — relevance ranking, top words, topic diversity, gensim coherence;
* ``quality.py`` — redundancy (topics repeating each other's top words, topics used by argmax
  theta, the warning) and label NMI / ARI of argmax theta (``label_column``);
* ``train.py`` — the Ray Train worker loop, checkpoints, resume and ``train_topic_model``;
* ``theta.py`` — theta for every document (a Ray Data pass), with its argmax and label;
* ``stage.py`` — ``run_topics``: the stage from dictionary to ``<output>/topics/``;
* ``read_back.py`` — ``topics_report`` / ``format_topics`` for ``embedjob topics OUTPUT`` (no torch).

Only the config class is imported here, so that loading a job's config stays cheap (no torch).
"""

from embedjob.stages.topics.config import TopicsConfig

__all__ = ["TopicsConfig"]
