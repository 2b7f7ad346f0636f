"""Word vectors on storage: the one reader and writer of gensim ``KeyedVectors`` in embedjob.

Why this module: gensim's native ``KeyedVectors.save`` / ``load`` format (``vectors.kv``) is a
pickle, and loading a pickle runs whatever code it names. A job's output usually sits on shared
storage that others can write to, and vector files given in settings come from anywhere; so
embedjob reads word vectors only from plain-data formats, and refuses a pickle unless a setting
says the user trusts that very file.

A vector folder (``<out>/static/``, ``<out>/word2vec/``), as :func:`write_keyed_vectors` writes it:

* ``vectors.bin`` — word2vec binary (words and float32 vectors): what embedjob reads back;
* ``vectors.vocab.txt`` — ``word count`` per line (word2vec's ``fvocab``), read with it;
* ``vectors_ngrams.npy``, ``vectors_vocab.npy`` + ``fasttext.json`` (FastText only) — the hashed
  character n-gram matrix and the words' own rows (``np.save``, read with ``allow_pickle=False``)
  and ``min_n``, ``max_n``, ``bucket``: with them the vectors read back are a whole
  ``FastTextKeyedVectors`` that answers words never seen in training, as gensim's FastText does;
* ``vectors.kv`` (+ gensim's ``.npy`` sidecars) — gensim native, for users
  (``KeyedVectors.load``); embedjob never reads it.

User-supplied vectors (``word2vec.init_from``, ``topics.embeddings``) are read by
:func:`read_keyed_vectors`: word2vec binary or text (``.bin``, ``.txt``, ``.vec``, optionally
``.gz``), or a float ``.npy`` matrix with its words in ``<name>.vocab.txt`` beside it.

Example::

    write_keyed_vectors(model.wv, Storage("s3://bucket/out/word2vec"))
    load_job_vectors("s3://bucket/out", {}, "word2vec").most_similar("king")
    read_keyed_vectors("glove.6B.100d.txt.gz", {}, setting="topics.embeddings")
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
from typing import Any, Optional, Sequence

import numpy as np

from embedjob.errors import WordVectorsError
from embedjob.storage import Storage, StorageError, join_url

logger = logging.getLogger(__name__)

KV_NAME = "vectors.kv"  # gensim native (a pickle): for users only
BIN_NAME = "vectors.bin"  # word2vec binary: what embedjob reads
VOCAB_NAME = "vectors.vocab.txt"  # "word count" per line
NGRAMS_NAME = "vectors_ngrams.npy"  # FastText: the (bucket, dim) n-gram matrix
WORD_ROWS_NAME = "vectors_vocab.npy"  # FastText: the words' own rows (before their n-grams are added)
FASTTEXT_NAME = "fasttext.json"  # FastText: min_n, max_n, bucket
FASTTEXT_FORMAT = "embedjob-fasttext-v1"

# Where each kind of job word vectors lives under the output root (written by the static and
# word2vec stages).
VECTOR_FOLDERS = {"bert": "static", "word2vec": "word2vec"}

PICKLE_SUFFIXES = (".kv", ".model", ".pkl", ".pickle")
PICKLE_OPCODE = b"\x80"  # first byte of every pickle of protocol 2 or later (gensim writes 4)
SAFE_FORMATS = ("word2vec binary (.bin) or text (.txt, .vec, optionally .gz), or a float .npy matrix with "
                "its words in <name>.vocab.txt beside it")


# -- names -----------------------------------------------------------------------------------------
def is_pickle_name(url: str) -> bool:
    """True when the file name says gensim-native pickle (``.kv``, ``.model``, ``.pkl``, ``.pickle``)."""
    return posixpath.basename(url.rstrip("/")).lower().endswith(PICKLE_SUFFIXES)


def pickle_refusal(setting: str, url: str, trust_setting: Optional[str] = None) -> str:
    """The one-line refusal of a pickle given as ``setting``: what, why, and the ways out."""
    trust = f", or set {trust_setting}=true if you trust this file" if trust_setting else ""
    return (f"{setting}={url!r} is a pickle (gensim's native KeyedVectors.save format) and loading a pickle can "
            f"run any code, so embedjob does not read it: give {SAFE_FORMATS} (convert once where you trust the "
            f"file: KeyedVectors.load(path).save_word2vec_format('vectors.bin', binary=True)){trust}")


def job_vectors_file(kind: str) -> str:
    """Path, relative to the output root, of the file that holds a job's ``kind`` vectors
    (``'bert'`` -> ``static/vectors.bin``, ``'word2vec'`` -> ``word2vec/vectors.bin``)."""
    if kind not in VECTOR_FOLDERS:
        raise ValueError(f"unknown word vectors kind {kind!r}; valid: {', '.join(VECTOR_FOLDERS)}")
    return f"{VECTOR_FOLDERS[kind]}/{BIN_NAME}"


# -- building --------------------------------------------------------------------------------------
def make_keyed_vectors(words: Sequence[str], vectors: np.ndarray, counts: Optional[Sequence[int]] = None, *,
                       fasttext: Optional[dict[str, Any]] = None, ngrams: Optional[np.ndarray] = None,
                       word_rows: Optional[np.ndarray] = None):
    """gensim ``KeyedVectors`` holding ``words`` in the given order with their float32 ``vectors``
    and, when given, each word's ``count`` attribute. With ``fasttext`` (``min_n``, ``max_n``,
    ``bucket``), the n-gram matrix ``ngrams`` and the words' own rows ``word_rows``
    (``vectors_vocab``), a ``FastTextKeyedVectors`` that also answers unseen words."""
    from gensim.models import KeyedVectors
    from gensim.models.fasttext import FastTextKeyedVectors

    vectors = np.asarray(vectors, dtype=np.float32)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    if fasttext is not None:
        kv = FastTextKeyedVectors(dim, int(fasttext["min_n"]), int(fasttext["max_n"]), int(fasttext["bucket"]))
    else:
        kv = KeyedVectors(dim, count=0, dtype=np.float32)
    words = list(words)
    if words:
        kv.add_vectors(words, vectors)
    if counts is not None:
        for w, c in zip(words, counts):
            kv.set_vecattr(w, "count", int(c))
    if fasttext is not None:
        kv.vectors_ngrams = np.asarray(ngrams, dtype=np.float32)
        kv.vectors_vocab = np.asarray(word_rows if word_rows is not None else vectors, dtype=np.float32)
        kv.vectors_vocab_lockf = np.ones(1, dtype=np.float32)  # as gensim's own load sets them
        kv.vectors_ngrams_lockf = np.ones(1, dtype=np.float32)
        kv.recalc_char_ngram_buckets()
    return kv


def _is_fasttext(kv) -> bool:
    from gensim.models.fasttext import FastTextKeyedVectors

    return isinstance(kv, FastTextKeyedVectors) and bool(kv.bucket) and kv.vectors_ngrams is not None \
        and kv.vectors_vocab is not None


# -- writing ---------------------------------------------------------------------------------------
def _ours(name: str) -> bool:
    """Files this module writes in a vector folder (others there, e.g. report.json, are left alone)."""
    return name in (KV_NAME, BIN_NAME, VOCAB_NAME, NGRAMS_NAME, WORD_ROWS_NAME, FASTTEXT_NAME) \
        or name.startswith(KV_NAME + ".")


def write_keyed_vectors(kv, folder: Storage) -> list[str]:
    """Write ``kv`` to ``folder``: ``vectors.bin`` (+ ``vectors.vocab.txt`` when words carry counts;
    + ``vectors_ngrams.npy``, ``vectors_vocab.npy`` and ``fasttext.json`` for FastText) for embedjob,
    and ``vectors.kv`` with its sidecars for users. Each file is a committed write; files of an
    earlier write that this one does not produce (a FastText run followed by a Word2Vec one) are
    deleted first, and ``vectors.bin`` — the file readers open first — is written last. Returns
    the names written."""
    fasttext = _is_fasttext(kv)
    with tempfile.TemporaryDirectory(prefix="embedjob-kv-") as tmp:
        kv.save(os.path.join(tmp, KV_NAME))
        has_counts = "count" in getattr(kv, "expandos", {})
        fvocab = os.path.join(tmp, VOCAB_NAME) if has_counts else None
        kv.save_word2vec_format(os.path.join(tmp, BIN_NAME), fvocab=fvocab, binary=True)
        if fasttext:
            for name, arr in ((NGRAMS_NAME, kv.vectors_ngrams), (WORD_ROWS_NAME, kv.vectors_vocab)):
                np.save(os.path.join(tmp, name), np.asarray(arr, dtype=np.float32), allow_pickle=False)
            with open(os.path.join(tmp, FASTTEXT_NAME), "w", encoding="utf-8") as f:
                json.dump({"format": FASTTEXT_FORMAT, "min_n": int(kv.min_n), "max_n": int(kv.max_n),
                           "bucket": int(kv.bucket), "vector_size": int(kv.vector_size), "words": len(kv)}, f)
        names = sorted(os.listdir(tmp))
        for stale in [n for n in folder.list() if _ours(n) and n not in names]:
            folder.delete(stale)
        users = [n for n in names if n == KV_NAME or n.startswith(KV_NAME + ".")]
        order = sorted(users, key=lambda n: (n == KV_NAME, n)) + \
            [n for n in (VOCAB_NAME, NGRAMS_NAME, WORD_ROWS_NAME, FASTTEXT_NAME) if n in names] + [BIN_NAME]
        for name in order:
            folder.upload(os.path.join(tmp, name), name)
    logger.info("word vectors: %d words (%s) written to %s", len(kv), "FastText" if fasttext else "KeyedVectors",
                folder.url())
    return names


# -- reading ---------------------------------------------------------------------------------------
def _read_word2vec(path: str, *, binary: bool, fvocab: Optional[str] = None):
    from gensim.models import KeyedVectors

    return KeyedVectors.load_word2vec_format(path, binary=binary, fvocab=fvocab)


def _load_npy(path: str, what: str) -> np.ndarray:
    """A float matrix from ``path`` (``allow_pickle=False``: an object array is refused)."""
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} holds a {arr.dtype} array of shape {arr.shape}, not a 2-D float matrix")
    return arr


def _read_vocab(path: str) -> tuple[list[str], Optional[list[int]]]:
    """Words (and counts, when every line has one) of a ``word[ count]`` per line file."""
    words: list[str] = []
    counts: list[Optional[int]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            word, _, tail = line.rpartition(" ")
            if word and tail.isdigit():
                words.append(word)
                counts.append(int(tail))
            else:
                words.append(line)
                counts.append(None)
    return words, (None if any(c is None for c in counts) else [int(c) for c in counts])


def read_vector_folder(folder: Storage):
    """The word vectors :func:`write_keyed_vectors` wrote to ``folder``, from the safe files only:
    ``vectors.bin`` with the counts of ``vectors.vocab.txt``, as ``FastTextKeyedVectors`` when
    ``fasttext.json`` and the ``.npy`` matrices are there. ``vectors.kv`` is never read."""
    if not folder.exists(BIN_NAME):
        hint = (f"; embedjob does not read {KV_NAME} (a pickle): rerun the stage with output.overwrite=true to "
                f"write {BIN_NAME}" if folder.exists(KV_NAME) else " (has the stage run?)")
        raise WordVectorsError(f"no word vectors at {folder.url(BIN_NAME)}{hint}")
    try:
        with tempfile.TemporaryDirectory(prefix="embedjob-kv-") as tmp:
            local = os.path.join(tmp, BIN_NAME)
            folder.download(BIN_NAME, local)
            fvocab = None
            if folder.exists(VOCAB_NAME):
                fvocab = os.path.join(tmp, VOCAB_NAME)
                folder.download(VOCAB_NAME, fvocab)
            kv = _read_word2vec(local, binary=True, fvocab=fvocab)
            if not folder.exists(FASTTEXT_NAME):
                return kv
            params = folder.read_json(FASTTEXT_NAME)
            arrays = {}
            for name in (NGRAMS_NAME, WORD_ROWS_NAME):
                folder.download(name, os.path.join(tmp, name))
                arrays[name] = _load_npy(os.path.join(tmp, name), folder.url(name))
    except (OSError, ValueError, KeyError, EOFError, UnicodeDecodeError) as e:
        raise WordVectorsError(f"cannot read the word vectors in {folder.url()}: {type(e).__name__}: {e}") from None
    ngrams, word_rows = arrays[NGRAMS_NAME], arrays[WORD_ROWS_NAME]
    if ngrams.shape != (int(params["bucket"]), kv.vector_size) or word_rows.shape != kv.vectors.shape:
        raise WordVectorsError(
            f"the FastText files in {folder.url()} ({NGRAMS_NAME} {ngrams.shape}, {WORD_ROWS_NAME} {word_rows.shape}) "
            f"do not match {BIN_NAME} ({len(kv)} words x {kv.vector_size}): files from different writes "
            "(being rewritten by a running job?); retry when the job has finished")
    counts = [kv.get_vecattr(w, "count") for w in kv.index_to_key] if fvocab else None
    return make_keyed_vectors(kv.index_to_key, kv.vectors, counts, fasttext=params, ngrams=ngrams,
                              word_rows=word_rows)


def load_job_vectors(output_url: str, storage_options: Optional[dict[str, Any]], kind: str):
    """The word vectors a job wrote: ``kind='bert'`` (``<out>/static/``) or ``'word2vec'``
    (``<out>/word2vec/``), read from the safe files only (see :func:`read_vector_folder`)::

        load_job_vectors("s3://bucket/out", {"anon": False}, "word2vec").most_similar("king")
    """
    rel = job_vectors_file(kind)
    return read_vector_folder(Storage(join_url(output_url, posixpath.dirname(rel)), storage_options or {}))


def _parent(store: Storage) -> Storage:
    url = store.url().rstrip("/")
    return Storage(url.rsplit("/", 1)[0] if "/" in url else ".", store.storage_options)


def read_keyed_vectors(url: str, storage_options: Optional[dict[str, Any]], *, setting: str,
                       trust_pickle: bool = False, trust_setting: Optional[str] = None):
    """Word vectors a user gave as ``setting`` (e.g. ``word2vec.init_from``), from any storage URL:
    word2vec binary or text (``.bin``, ``.txt``, ``.vec``, optionally ``.gz``), or a float ``.npy``
    matrix with ``<name>.vocab.txt`` beside it (read with ``allow_pickle=False``).

    A pickle — a name ending ``.kv``/``.model``/``.pkl``/``.pickle``, or a file whose first byte is
    the pickle opcode 0x80 — is refused with one line naming ``setting``, the URL, the safe formats
    and ``trust_setting``, unless ``trust_pickle`` (then it is loaded with gensim's
    ``KeyedVectors.load``, its ``.npy`` sidecars beside it). Errors are :class:`WordVectorsError`."""
    try:
        store = Storage(url, storage_options or {})
        if not store.exists():
            raise WordVectorsError(f"{setting}={url!r} cannot be read as word vectors: the file does not exist")
        name = posixpath.basename(store.path().rstrip("/"))
        if is_pickle_name(name) and not trust_pickle:
            raise WordVectorsError(pickle_refusal(setting, url, trust_setting))
        with tempfile.TemporaryDirectory(prefix="embedjob-vectors-") as tmp:
            local = os.path.join(tmp, name)
            store.download("", local)
            with open(local, "rb") as f:
                head = f.read(1)
            if head == PICKLE_OPCODE or is_pickle_name(name):
                if not trust_pickle:
                    raise WordVectorsError(pickle_refusal(setting, url, trust_setting))
                return _load_trusted_pickle(store, name, local, tmp)
            if name.endswith(".npy"):
                return _read_npy_vectors(store, name, local, tmp)
            first = name.endswith((".bin", ".bin.gz"))
            errors = []
            for binary in (first, not first):
                try:
                    return _read_word2vec(local, binary=binary)
                except Exception as e:  # noqa: BLE001 - both attempts are reported below
                    errors.append(f"as {'binary' if binary else 'text'}: {type(e).__name__}: {e}")
            raise ValueError("; ".join(errors))
    except WordVectorsError:
        raise
    except (StorageError, OSError, ValueError, KeyError, EOFError, ImportError, AttributeError) as e:
        raise WordVectorsError(f"{setting}={url!r} cannot be read as word vectors ({SAFE_FORMATS}): {e}") from None


def _load_trusted_pickle(store: Storage, name: str, local: str, tmp: str):
    """gensim's native load of a pickle the user said they trust, with its ``.npy`` sidecars."""
    from gensim.models import KeyedVectors

    parent = _parent(store)
    for sib in parent.list():
        if sib.startswith(name + ".") and sib.endswith(".npy"):
            parent.download(sib, os.path.join(tmp, sib))
    logger.warning("loading the pickle %s (trusted by setting): it runs any code it holds", store.url())
    try:
        return KeyedVectors.load(local)
    except Exception as e:  # noqa: BLE001 - whatever the pickle raised, reported as one line
        raise ValueError(f"gensim's KeyedVectors.load failed: {type(e).__name__}: {e}") from None


def _read_npy_vectors(store: Storage, name: str, local: str, tmp: str):
    """A ``.npy`` matrix and the words of ``<name>.vocab.txt`` (one per line, optionally ``word count``)."""
    stem = name[: -len(".npy")]
    vocab_name = f"{stem}.vocab.txt"
    parent = _parent(store)
    if not parent.exists(vocab_name):
        raise ValueError(f"{parent.url(vocab_name)} (the words of {name}, one per line) does not exist")
    vectors = _load_npy(local, name)
    parent.download(vocab_name, os.path.join(tmp, vocab_name))
    words, counts = _read_vocab(os.path.join(tmp, vocab_name))
    if len(words) != len(vectors):
        raise ValueError(f"{vocab_name} lists {len(words)} words but {name} has {len(vectors)} rows")
    return make_keyed_vectors(words, vectors, counts)
