"""The synthetic models and documents of `.ci/gpu-check` (:mod:`embedjob.bench.gpu_check`): random
weights of a named shape with a synthetic WordPiece vocabulary, and documents whose token lengths
follow the shared corpus's histogram. Needs torch and transformers only (a bare GPU host)."""

from __future__ import annotations

import itertools
import json
import os
import string
from pathlib import Path

import numpy as np

HISTOGRAM = Path(__file__).parent / "data" / "token_lengths_mixed_en.json"
SHAPES = {
    "minilm-l6": ({"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                   "intermediate_size": 1536}, 256),
    "bert-base": ({"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "intermediate_size": 3072}, 512),
    "tiny": ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}, 128),
}
VOCAB_SIZE = 30522
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."]  # "." ends sentences (windows snap to them)


def synthetic_vocab(size: int = VOCAB_SIZE) -> list[str]:
    """Special tokens, then lower-case letter strings: each one a whole word of the vocabulary, so a
    text of k such words tokenises to exactly k + 2 tokens."""
    words = itertools.chain.from_iterable(
        ("".join(p) for p in itertools.product(string.ascii_lowercase, repeat=n)) for n in (2, 3, 4))
    return SPECIAL + list(itertools.islice(words, size - len(SPECIAL)))


def build_model_dir(root: str, name: str, seed: int = 0) -> str:
    """A model folder with random weights of shape ``name``, a synthetic vocabulary, and the
    sentence-transformers files (mean pooling, max_seq_length) both embedjob and ST read."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    shape, max_length = SHAPES[name]
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    vocab = synthetic_vocab()
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=os.path.join(path, "vocab.txt"), do_lower_case=True).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), max_position_embeddings=512, **shape)
    BertModel(cfg).save_pretrained(path)
    dim = shape["hidden_size"]
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    files = {
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                         {"idx": 1, "name": "1", "path": "1_Pooling",
                          "type": "sentence_transformers.models.Pooling"}],
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
        "1_Pooling/config.json": {"word_embedding_dimension": dim, "pooling_mode_mean_tokens": True,
                                  "pooling_mode_cls_token": False, "pooling_mode_max_tokens": False},
    }
    for rel, content in files.items():
        with open(os.path.join(path, rel), "w") as f:
            json.dump(content, f)
    return path


def sample_lengths(n: int, max_length: int, rng: np.random.Generator) -> np.ndarray:
    """Token lengths (special tokens included) drawn from the shipped histogram, truncated at
    ``max_length`` as the encoder truncates."""
    hist = json.loads(HISTOGRAM.read_text())
    edges, counts = np.asarray(hist["edges"], dtype=np.int64), np.asarray(hist["counts"], dtype=np.float64)
    bins = rng.choice(len(counts), size=n, p=counts / counts.sum())
    hi = np.minimum(edges[bins + 1], edges[bins] + 4096)
    lengths = rng.integers(edges[bins], np.maximum(hi, edges[bins] + 1))
    return np.clip(lengths, 3, max_length)


def make_texts(lengths: np.ndarray, rng: np.random.Generator, sentence: int = 0, fresh: float = 0.0) -> list[str]:
    """Texts of ``lengths`` tokens each ([CLS]/[SEP] included) of random words; ``sentence`` > 0:
    about every that many tokens a "." ends a sentence; ``fresh``: that share of the words are new
    8-letter strings (each one [UNK], so the lengths hold), as a real corpus keeps bringing words it
    has not seen (the chunk cache's misses: 3.3% of mixed-en's chunks over its first 4 shards)."""
    words = np.array(synthetic_vocab()[len(SPECIAL):], dtype=object)
    out = []
    for L in lengths:
        w = words[rng.integers(0, len(words), size=int(L) - 2)]
        if fresh:
            at = np.flatnonzero(rng.random(len(w)) < fresh)
            letters = rng.integers(0, 26, size=(len(at), 8)) + ord("a")
            w[at] = [bytes(r).decode() for r in letters.astype(np.uint8)]
        if sentence:
            w[rng.random(len(w)) < 1 / sentence] = "."
        out.append(" ".join(w))
    return out
