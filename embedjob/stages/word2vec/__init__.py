"""Word2Vec / FastText (temporary)."""

from embedjob.stages.word2vec.stage import Word2VecConfig

__all__ = ["Word2VecConfig"]
