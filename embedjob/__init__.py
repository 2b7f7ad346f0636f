"""embedjob: a distributed batch embedding job on Ray.

Read Parquet shards from any fsspec store, preprocess with gensim, encode with BERT in Ray Data
actor pools, derive static word vectors, train Word2Vec and a topic model with Ray Train, build
FAISS indices, and write it all back with a manifest. Entry point: ``embedjob run JOB.yaml``.
"""

__version__ = "0.1.0"
