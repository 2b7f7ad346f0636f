"""BERT static word vectors aggregated in the encode pass (issue 4). Placeholder section until built."""

from pydantic import Field

from embedjob._config_base import Section


class StaticConfig(Section):
    enabled: bool = Field(False, description="Aggregate BERT static word vectors during encoding.")
