"""FAISS indices over document and word vectors (issue 7). Placeholder section until built."""

from pydantic import Field

from embedjob._config_base import Section


class IndexConfig(Section):
    enabled: bool = Field(False, description="Build FAISS indices.")
