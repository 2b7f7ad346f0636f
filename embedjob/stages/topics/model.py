"""The topic model in torch: ``TopicModel`` (variational encoder + ETM or ProdLDA decoder), BoW
batches as tensors, initialisation, theta inference and ``topics/model.pt`` (written and read
back as a plain dict, ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torch.nn import functional as F

from embedjob.errors import TopicsError
from embedjob.layout import TOPICS_MODEL
from embedjob.stages.topics.bow import bow_from_token_lists
from embedjob.stages.topics.config import TopicsConfig
from embedjob.storage import Storage

FORMAT = "embedjob-topics-v1"


class TopicModel(nn.Module):
    """Variational encoder over the normalised BoW + ETM or ProdLDA decoder.

    ETM: beta = softmax_V(rho @ alpha^T), p(w|d) = theta_d . beta[:, w], prior N(0, I).
    ProdLDA: p(.|d) = softmax(BN(W theta_d + b)), prior: Laplace approximation of Dirichlet(1).
    """

    def __init__(self, vocab_size: int, num_topics: int, hidden_size: int = 512, *, kind: str = "etm",
                 embedding_dim: int = 300, rho_trainable: bool = True, n_missing: int = 0,
                 dropout: float = 0.2, batchnorm: bool = True, background: bool = False,
                 encoder: str = "bow", prior: str = "normal", prior_alpha: float = 1.0):
        super().__init__()
        self.vocab_size, self.num_topics, self.kind = vocab_size, num_topics, kind
        self.batchnorm = batchnorm
        if encoder not in ("bow", "embeddings") or (encoder == "embeddings" and kind != "etm"):
            raise TopicsError(f"topics.encoder: {encoder!r} is not valid for model {kind!r}")
        self.encoder = encoder
        if encoder == "bow":
            self.embed = nn.EmbeddingBag(vocab_size, hidden_size, mode="sum")
            self.embed_bias = nn.Parameter(torch.zeros(hidden_size))
        else:
            self.enc_in = nn.Linear(embedding_dim, hidden_size)
        self.enc2 = nn.Linear(hidden_size, hidden_size)
        self.drop = nn.Dropout(dropout)
        self.mu = nn.Linear(hidden_size, num_topics)
        self.logvar = nn.Linear(hidden_size, num_topics)
        if batchnorm:
            self.mu_bn = nn.BatchNorm1d(num_topics, affine=False)
            self.logvar_bn = nn.BatchNorm1d(num_topics, affine=False)
        if kind == "etm":
            if rho_trainable:
                self.rho = nn.Parameter(torch.randn(vocab_size, embedding_dim) / math.sqrt(embedding_dim))
            else:
                self.register_buffer("rho", torch.zeros(vocab_size, embedding_dim))
            self.n_missing = n_missing
            self.register_buffer("missing_idx", torch.zeros(n_missing, dtype=torch.long))
            if n_missing:
                self.rho_missing = nn.Parameter(torch.randn(n_missing, embedding_dim) / math.sqrt(embedding_dim))
            self.alpha = nn.Linear(embedding_dim, num_topics, bias=False)
            self.background = background
            if background:  # log unigram frequencies, set by init_model, saved with the weights
                self.register_buffer("log_background", torch.zeros(vocab_size))
        elif kind == "prodlda":
            self.beta = nn.Linear(num_topics, vocab_size)
            self.beta_bn = nn.BatchNorm1d(vocab_size, affine=False)
            self.theta_drop = nn.Dropout(dropout)
            prior = "dirichlet"
        else:
            raise TopicsError(f"topics.model: unknown model {kind!r}; valid: etm, prodlda")
        self.prior = prior
        if prior == "dirichlet":
            # Laplace approximation of a symmetric Dirichlet(a) in the softmax basis (Srivastava &
            # Sutton 2017): mean 0, variance (1/a)(1 - 2/K) + 1/(K a); a = 1 gives 1 - 1/K.
            k, a = float(num_topics), float(prior_alpha)
            self.register_buffer("prior_var", torch.full((num_topics,), (1.0 / a) * (1.0 - 2.0 / k) + 1.0 / (k * a)))

    # -- pieces ---------------------------------------------------------------------------
    def word_embeddings(self):
        if self.n_missing:
            return self.rho.index_copy(0, self.missing_idx, self.rho_missing)
        return self.rho

    def encode(self, ids, offsets, weights):
        if self.encoder == "bow":
            h = F.softplus(self.embed(ids, offsets, per_sample_weights=weights) + self.embed_bias)
        else:  # the document's mean word embedding (rho's initial rows for words still being learned)
            x = F.embedding_bag(ids, self.rho.detach(), offsets, mode="sum", per_sample_weights=weights)
            h = F.softplus(self.enc_in(x))
        h = self.drop(F.softplus(self.enc2(h)))
        mu, logvar = self.mu(h), self.logvar(h)
        if self.batchnorm:
            mu, logvar = self.mu_bn(mu), self.logvar_bn(logvar)
        return mu, logvar

    def theta(self, ids, offsets, weights):
        """Document-topic proportions (the posterior mean's softmax, no sampling)."""
        mu, _ = self.encode(ids, offsets, weights)
        return F.softmax(mu, dim=1)

    def topic_logits(self):
        """(K, V) ETM logits: alpha_k . rho (+ the log background frequency)."""
        logits = self.alpha.weight @ self.word_embeddings().t()
        if self.background:
            logits = logits + self.log_background
        return logits

    def log_topic_word(self):
        """(K, V) log topic-word distributions."""
        if self.kind == "etm":
            return F.log_softmax(self.topic_logits(), dim=1)
        return F.log_softmax(self.beta.weight.t(), dim=1)

    def topic_word(self):
        """(K, V) topic-word distributions."""
        return self.log_topic_word().exp()

    def kl(self, mu, logvar):
        if self.prior == "normal":
            return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(1)
        pv = self.prior_var
        return 0.5 * (logvar.exp() / pv + mu.pow(2) / pv - 1.0 + pv.log() - logvar).sum(1)

    def forward(self, ids, offsets, weights, counts, doc_index):
        """Per-document (reconstruction NLL, KL)."""
        mu, logvar = self.encode(ids, offsets, weights)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        n = z.shape[0]
        if self.kind == "etm":
            # p(w|d) = theta_d . beta[:, w], only at the document's words: beta is normalised once as
            # a (V, K) matrix, whose rows are gathered at the batch's word ids (contiguous K-vectors),
            # and the dot products are taken in probability space: no exp/log per (word, topic) pair,
            # about a third of the time of a logsumexp over log theta + log beta at K=50 on a CPU.
            beta_t = F.softmax(self.topic_logits(), dim=1).t().contiguous()
            theta = F.softmax(z, dim=1)
            p = (beta_t.index_select(0, ids) * theta.index_select(0, doc_index)).sum(1)
            logp = p.clamp_min(1e-30).log()
        else:
            theta = F.softmax(z, dim=1)
            logits = self.beta_bn(self.beta(self.theta_drop(theta)))
            logp = F.log_softmax(logits, dim=1)[doc_index, ids]
        nll = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(0, doc_index, -counts * logp)
        return nll, self.kl(mu, logvar)


def batch_tensors(word_ids: pa.Array | pa.ChunkedArray, counts: pa.Array | pa.ChunkedArray, device: Any = "cpu"):
    """BoW list columns -> ``(ids, offsets, weights, counts, doc_index)`` tensors for the model:
    flat word ids, bag start offsets, length-normalised weights (the encoder input), raw counts and
    the document of each entry."""
    if isinstance(word_ids, pa.ChunkedArray):
        word_ids = word_ids.combine_chunks()
    if isinstance(counts, pa.ChunkedArray):
        counts = counts.combine_chunks()
    offsets = word_ids.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    ids = word_ids.flatten().to_numpy().astype(np.int64)
    cnt = counts.flatten().to_numpy().astype(np.float32)
    lengths = np.diff(offsets)
    doc_index = np.repeat(np.arange(len(lengths)), lengths)
    totals = np.bincount(doc_index, weights=cnt, minlength=len(lengths))
    totals = np.where(lengths > 0, totals, 1.0).astype(np.float32)
    weights = cnt / totals[doc_index]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return t(ids), t(offsets[:-1]), t(weights), t(cnt), t(doc_index)


def init_model(kwargs: dict[str, Any], rho: Optional[np.ndarray], missing: Optional[np.ndarray], seed: int,
               word_counts: Optional[np.ndarray] = None):
    """A freshly initialised model with the pre-fitted rows of rho copied in (and, for an ETM with a
    background, the log frequencies of ``word_counts``)."""
    torch.manual_seed(seed)
    model = TopicModel(**kwargs)
    if kwargs.get("background") and word_counts is not None:
        freq = np.asarray(word_counts, np.float64) + 1.0
        with torch.no_grad():
            model.log_background.copy_(torch.from_numpy(np.log(freq / freq.sum()).astype(np.float32)))
    if kwargs["kind"] == "etm" and rho is not None:
        with torch.no_grad():
            model.rho.copy_(torch.from_numpy(rho))
            if kwargs["n_missing"]:
                model.missing_idx.copy_(torch.from_numpy(np.flatnonzero(missing)))
                model.rho_missing.copy_(torch.from_numpy(rho[missing]))
    return model


def infer_theta(model, word_ids: pa.Array, counts: pa.Array, *, batch_size: int = 4096) -> np.ndarray:
    """Document-topic proportions ``(n, K)`` float32 of BoW documents (:func:`bow_arrays` output)
    with a trained model; rows sum to 1 (an empty document gets the encoder's bias-only answer)."""
    was_training = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(word_ids), batch_size):
            ids, offsets, weights, _, _ = batch_tensors(word_ids[s:s + batch_size], counts[s:s + batch_size])
            out.append(model.theta(ids, offsets, weights).float().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.num_topics), np.float32)


@dataclass
class TrainedTopicModel:
    """A trained model with its vocabulary (what ``topics/model.pt`` holds)."""

    model: Any
    vocab: list[str]
    config: dict[str, Any]

    def infer_tokens(self, docs: Sequence[Sequence[str]]) -> np.ndarray:
        """Theta of new documents given as token lists (tokenise them as the job did:
        ``embedjob.stages.preprocess.preprocess_texts``)."""
        ids, cnt = bow_from_token_lists(docs, self.vocab)
        return infer_theta(self.model, ids, cnt)

    def topic_word(self) -> np.ndarray:
        with torch.no_grad():
            return self.model.topic_word().float().numpy()


def model_bytes(model: TopicModel, kwargs: dict[str, Any], vocab: list[str], cfg: TopicsConfig) -> bytes:
    """The bytes of ``topics/model.pt``: a plain dict (format, model arguments, state dict, vocabulary,
    settings) that ``torch.load(weights_only=True)`` reads."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "model_kwargs": kwargs, "state_dict": model.state_dict(), "vocab": vocab,
                "config": cfg.model_dump()}, buf)
    return buf.getvalue()


def model_from_bytes(data: bytes) -> tuple[TopicModel, dict[str, Any]]:
    """The model (CPU, eval mode) saved in ``model.pt`` or a checkpoint, and the whole saved dict."""
    blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = TopicModel(**blob["model_kwargs"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, blob


def load_topic_model(url: str, storage_options: Optional[dict[str, Any]] = None) -> TrainedTopicModel:
    """Load ``topics/model.pt`` from a job output folder (or the file's own URL)."""
    store = Storage(url, storage_options or {})
    rel = "" if url.endswith(".pt") else TOPICS_MODEL
    if not store.exists(rel):
        raise TopicsError(f"no topic model at {store.url(rel)!r}: run the job with topics.enabled=true")
    model, blob = model_from_bytes(store.read_bytes(rel))
    return TrainedTopicModel(model, list(blob["vocab"]), dict(blob.get("config", {})))
