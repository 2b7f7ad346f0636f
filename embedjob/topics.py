"""ETM / ProdLDA topic model trained with Ray Train (issue 6). Placeholder section until built."""

from pydantic import Field

from embedjob._config_base import Section


class TopicsConfig(Section):
    enabled: bool = Field(False, description="Train the topic model.")
