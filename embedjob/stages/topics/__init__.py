"""Topic model stage."""

from embedjob.stages.topics.stage import TopicsConfig

__all__ = ["TopicsConfig"]
