"""Index stage."""

from embedjob.stages.index.stage import IndexConfig

__all__ = ["IndexConfig"]
