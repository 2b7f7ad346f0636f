"""Tiny random-weight models of many architectures and sentence-transformers pipelines, built
offline and saved with sentence-transformers, for the tests that check embedjob encodes each one
exactly as ``SentenceTransformer.encode`` does.

Tokenizers: WordPiece (MiniLM's real vocabulary), byte-level BPE (RoBERTa, Qwen) and a SentencePiece-
style Unigram (XLM-R), the last two trained here with the ``tokenizers`` library on a few texts.
``Zoo`` builds each model once per session (``zoo.get(name)``)."""

from __future__ import annotations

import os
from typing import Any, Callable

from tests.conftest import SAMPLE_TEXTS

HIDDEN = 32
TRAIN_TEXTS = SAMPLE_TEXTS * 4 + [
    "Query: passage: represent this sentence for searching relevant passages.",
    "Instruct: given a web search query, retrieve relevant passages that answer the query",
    "A long document talks about many things. It has sentences! Does it end? Yes.",
]


def _bpe_tokenizer(kind: str):
    """A byte-level BPE (``roberta``: <s> .. </s>; ``qwen``: text then <|endoftext|>) or a Unigram
    with Metaspace (``xlmr``: <s> .. </s>), trained on TRAIN_TEXTS, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "xlmr":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>")
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if kind == "roberta" else ["<|endoftext|>", "<pad>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXTS, trainer)
    if kind == "qwen":
        eos = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                           special_tokens=[("<|endoftext|>", eos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                       padding_side="left")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")


def _hf_model(arch: str, vocab_size: int, tok: Any):
    """A random-weight transformers model of ``arch`` (hidden 32, 2 layers)."""
    import transformers as tf

    small = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if arch == "bert":
        return tf.BertModel(tf.BertConfig(vocab_size=vocab_size, max_position_embeddings=128, **small))
    if arch in ("roberta", "xlmr"):
        cls = tf.XLMRobertaConfig if arch == "xlmr" else tf.RobertaConfig
        model_cls = tf.XLMRobertaModel if arch == "xlmr" else tf.RobertaModel
        return model_cls(cls(vocab_size=vocab_size, max_position_embeddings=130, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **small),
                         add_pooling_layer=False)
    if arch == "distilbert":
        return tf.DistilBertModel(tf.DistilBertConfig(vocab_size=vocab_size, dim=HIDDEN, n_layers=2, n_heads=2,
                                                      hidden_dim=64, max_position_embeddings=128))
    if arch == "mpnet":
        return tf.MPNetModel(tf.MPNetConfig(vocab_size=vocab_size, max_position_embeddings=130, **small),
                             add_pooling_layer=False)
    if arch == "modernbert":
        return tf.ModernBertModel(tf.ModernBertConfig(
            vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, cls_token_id=tok.cls_token_id,
            sep_token_id=tok.sep_token_id, global_attn_every_n_layers=2, local_attention=16))
    if arch == "qwen3":
        return tf.Qwen3Model(tf.Qwen3Config(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                            intermediate_size=64, max_position_embeddings=256,
                                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    raise ValueError(arch)


def build_st_model(root: str, name: str, minilm_path: str, *, arch: str = "bert", pooling: Any = "mean",
                   legacy_pooling: bool = False, include_prompt: bool = True, dense: tuple = (),
                   layer_norm: bool = False, normalize: bool = False, prompts: dict | None = None,
                   default_prompt_name: str | None = None, truncate_dim: int | None = None,
                   max_seq_length: int = 64, seed: int = 0) -> str:
    """Build a random-weight ``arch`` model with the given sentence-transformers modules and save it
    under ``root/name`` with sentence-transformers; returns the folder."""
    import json

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import LayerNorm, Pooling
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    hf_dir = os.path.join(root, name + "-hf")
    if arch in ("roberta", "xlmr", "qwen3"):
        tok = _bpe_tokenizer({"roberta": "roberta", "xlmr": "xlmr", "qwen3": "qwen"}[arch])
    else:
        tok = AutoTokenizer.from_pretrained(minilm_path)
    _hf_model(arch, len(tok), tok).save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    modules: list[Any] = [Transformer(hf_dir, max_seq_length=max_seq_length),
                          Pooling(HIDDEN, pooling_mode=pooling, include_prompt=include_prompt)]
    dim = modules[1].get_embedding_dimension()
    for out, act in dense:
        modules.append(Dense(dim, out, activation_function=act))
        dim = out
    if layer_norm:
        modules.append(LayerNorm(dim))
    if normalize:
        modules.append(Normalize())
    path = os.path.join(root, name)
    SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name=default_prompt_name,
                        truncate_dim=truncate_dim, device="cpu").save(path)
    if legacy_pooling:  # the boolean keys older sentence-transformers wrote
        modes = (pooling,) if isinstance(pooling, str) else tuple(pooling)
        from embedjob.stages.encode.modules import LEGACY_POOLING_KEYS

        cfg = {"word_embedding_dimension": HIDDEN, **{k: m in modes for k, m in LEGACY_POOLING_KEYS.items()}}
        with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
            json.dump(cfg, f)
    return path


# name -> build_st_model keyword arguments
ZOO: dict[str, dict[str, Any]] = {
    "bert-cls": dict(pooling="cls"),
    "bert-max": dict(pooling="max", legacy_pooling=True),
    "bert-cls-legacy": dict(pooling="cls", legacy_pooling=True),
    "bert-mean-sqrt": dict(pooling="mean_sqrt_len_tokens"),
    "bert-weightedmean": dict(pooling="weightedmean"),
    "bert-lasttoken": dict(pooling="lasttoken"),
    "bert-combo": dict(pooling=("cls", "max", "mean"), normalize=True),
    "bert-dense": dict(dense=((24, None), (16, "tanh")), layer_norm=True, normalize=True),
    "bert-prompt": dict(prompts={"query": "query: ", "passage": "passage: "}, default_prompt_name="query",
                        normalize=True),
    "bert-prompt-excluded": dict(pooling="mean", include_prompt=False,
                                 prompts={"query": "Represent this sentence: "}, default_prompt_name="query"),
    "bert-matryoshka": dict(truncate_dim=16, normalize=True),
    "roberta": dict(arch="roberta", normalize=True),
    "xlmr": dict(arch="xlmr", pooling="cls", normalize=True),
    "distilbert": dict(arch="distilbert"),
    "mpnet": dict(arch="mpnet", normalize=True),
    "modernbert": dict(arch="modernbert", pooling="mean", normalize=True),
    "qwen3": dict(arch="qwen3", pooling="lasttoken", normalize=True, max_seq_length=128,
                  prompts={"query": "Instruct: given a web search query\nQuery: ", "document": ""},
                  default_prompt_name="query"),
}


class Zoo:
    """Builds each model of :data:`ZOO` on first use, once per session."""

    def __init__(self, root: str, minilm_path: str):
        self.root, self.minilm_path = root, minilm_path
        self.built: dict[str, str] = {}

    def get(self, name: str, **overrides: Any) -> str:
        key = name + "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
        if key not in self.built:
            kwargs = {**ZOO[name], **overrides}
            acts: Callable[[Any], Any] = _activation
            kwargs["dense"] = tuple((o, acts(a)) for o, a in kwargs.get("dense", ()))
            self.built[key] = build_st_model(self.root, key.replace("=", "_"), self.minilm_path, **kwargs)
        return self.built[key]


def _activation(name: Any) -> Any:
    import torch

    return {None: torch.nn.Identity(), "tanh": torch.nn.Tanh(), "gelu": torch.nn.GELU()}[name]
