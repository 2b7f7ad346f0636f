"""The ``static:`` settings, the layer and word-pooling choices, and the plain settings handed to the
preprocess tasks and encoder actors (checked against the model's depth on the driver)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence, Union

from pydantic import Field, field_validator

from embedjob._config_base import Section
from embedjob.models import resolve_model_path

if TYPE_CHECKING:
    from embedjob.storage import Storage

WORD_POOLING_MODES = ("mean", "first", "last", "max")
LAYER_MODES = ("last", "last4", "all")


class StaticConfig(Section):
    enabled: bool = Field(
        True,
        description="Aggregate BERT static word vectors during encoding (no second model pass) and write "
        "<out>/static/vectors.bin (word2vec binary, counts in vectors.vocab.txt) and vectors.kv (gensim native).",
    )
    word_pooling: Literal["mean", "first", "last", "max"] = Field(
        "mean",
        description="How a word's word pieces become one contextual vector: mean of the pieces, the first "
        "or the last piece, or their element-wise max.",
    )
    layers: Union[Literal["last", "last4", "all"], list[int]] = Field(
        "last",
        description="Hidden layer(s) the vectors come from: 'last', 'last4' (mean of the last four), 'all' "
        "(mean of every transformer layer), or a list of hidden_states indices (0 = embedding output, "
        "1..L = transformer layers, negatives count from the end), averaged.",
    )
    min_count: int = Field(
        5, ge=1, description="Words seen fewer times than this in the committed corpus get no vector."
    )
    postprocess: Literal["none", "center", "abtt"] = Field(
        "none",
        description="Applied to the final vectors: 'none'; 'center' subtracts the vocabulary mean; 'abtt' "
        "('all-but-the-top', Mu & Viswanath 2018) also removes the top principal directions "
        "(abtt_components), which BERT's anisotropic spaces share.",
    )
    abtt_components: int = Field(
        3, ge=0, description="Principal directions removed by postprocess=abtt (fitted on the kept words)."
    )

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("static.layers: give at least one layer index, or 'last' / 'last4' / 'all'")
        return v


@dataclasses.dataclass(frozen=True)
class StaticSettings:
    """What the preprocess tasks and encoder actors need of the static stage (plain values, sent to
    Ray workers): how word pieces pool into words, from which layers, and where the staged parts go."""

    word_pooling: str
    layers: Union[str, tuple[int, ...]]
    out_url: str
    storage_options: dict

    def accumulator_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~embedjob.stages.static.accumulate.StaticAccumulator`."""
        return {"word_pooling": self.word_pooling, "layers": self.layers, "out_url": self.out_url,
                "storage_options": dict(self.storage_options)}


def static_actor_settings(static: StaticConfig, model: str, out: "Storage") -> StaticSettings:
    """The settings the preprocess tasks and encoder actors need (static options plus where staged
    parts go). Checks ``static.layers`` against the depth of ``model`` (``encode.model``) on the
    driver, before any Ray work."""
    try:
        with open(os.path.join(resolve_model_path(model), "config.json")) as f:
            depth = json.load(f).get("num_hidden_layers")
    except (OSError, ValueError):
        depth = None
    if depth:
        resolve_layers(static.layers, depth)
    layers = static.layers if isinstance(static.layers, str) else tuple(int(i) for i in static.layers)
    return StaticSettings(word_pooling=static.word_pooling, layers=layers, out_url=out.url(),
                          storage_options=dict(out.storage_options))


def resolve_layers(layers: Union[str, Sequence[int]], num_hidden_layers: int) -> Optional[tuple[int, ...]]:
    """``hidden_states`` indices for ``static.layers`` (None = the last hidden state, no extra output).

    ``hidden_states`` has ``L + 1`` entries: the embedding output, then each of the L layers."""
    L = int(num_hidden_layers)
    if layers == "last":
        return None
    if layers == "last4":
        return tuple(range(max(1, L - 3), L + 1))
    if layers == "all":
        return tuple(range(1, L + 1))
    if isinstance(layers, str):
        raise ValueError(f"static.layers={layers!r}; valid: {', '.join(LAYER_MODES)} or a list of indices")
    out = []
    for i in layers:
        j = int(i) + (L + 1 if int(i) < 0 else 0)
        if not 0 <= j <= L:
            raise ValueError(f"static.layers: index {i} is out of range for a model with {L} layers "
                             f"(valid 0..{L} or -{L + 1}..-1)")
        out.append(j)
    return tuple(out)


def check_word_pooling(word_pooling: str) -> str:
    """``word_pooling`` when it is one of :data:`WORD_POOLING_MODES`; a ValueError listing them otherwise."""
    if word_pooling not in WORD_POOLING_MODES:
        raise ValueError(f"static.word_pooling={word_pooling!r}; valid: {', '.join(WORD_POOLING_MODES)}")
    return word_pooling
