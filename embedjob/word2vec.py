"""Word2Vec trained data-parallel with Ray Train (issue 5). Placeholder section until built."""

from pydantic import Field

from embedjob._config_base import Section


class Word2VecConfig(Section):
    enabled: bool = Field(False, description="Train Word2Vec on the job's tokens.")
