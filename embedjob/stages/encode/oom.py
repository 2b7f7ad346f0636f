"""Out of memory in the encoder: split the batch, lower the token budget, isolate what cannot fit.

A model batch that raises CUDA out-of-memory (``torch.OutOfMemoryError``) or any other allocator
failure is split in two and each half retried at half the batch's token budget, recursively, down
to a single window. The encoder keeps the lowered budget (:class:`OomBudget`) for every later batch
of the actor, and the manifest records it (``stages.encode.oom``). A single window that still does
not fit raises :class:`DocumentTooLarge` naming its document; the actor then encodes the rest of
its block without that document and reports it by id (its shard fails under
``input.on_bad_shard``), while the actor itself lives on.

Only a batch whose forward raised is rerun: the static word-vector hook runs after a batch's
forward, so nothing is counted twice.

Example::

    for idx, pooled in split_on_oom(lambda i: forward(i), batch_idx, cost, budget):
        ...   # sub-batches in any order, each with the windows it holds
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import numpy as np

logger = logging.getLogger(__name__)

MIN_BATCH_TOKENS = 64  # the lowest token budget an OOM lowers encode.batch_tokens to
# Messages of allocator failures that are not torch.OutOfMemoryError (cuBLAS/cuDNN workspaces, the
# CPU allocator, other accelerators).
ALLOCATOR_FAILURES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                      "can't allocate memory", "Failed to allocate", "OutOfMemory")


class WindowTooLarge(Exception):
    """One model input (window ``window``) does not fit in memory even alone."""

    def __init__(self, window: int, cause: BaseException):
        super().__init__(f"window {window} does not fit in memory alone: {cause}")
        self.window, self.cause = window, cause


class DocumentTooLarge(Exception):
    """Document ``doc`` (position in the encoder call's input) does not fit in memory, even alone."""

    def __init__(self, doc: int, cause: BaseException, batch_tokens: int):
        super().__init__(f"does not fit in the encoder's memory even alone (token budget lowered to "
                         f"{batch_tokens}): {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
        self.doc, self.cause, self.batch_tokens = doc, cause, batch_tokens


def is_allocator_failure(e: BaseException) -> bool:
    """True for CUDA out-of-memory and other allocator failures (not for other errors)."""
    if isinstance(e, MemoryError):
        return True
    try:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(e, RuntimeError) and any(m in str(e) for m in ALLOCATOR_FAILURES)


class OomBudget:
    """The encoder's token budget and what out-of-memory did to it (kept for the actor's life)."""

    def __init__(self, batch_tokens: int):
        self.configured = self.batch_tokens = int(batch_tokens)
        self.ooms = 0  # model batches that raised an allocator failure
        self.retried_batches = 0  # sub-batches run again after a split
        self.unfit_documents = 0

    def lower(self, cost: int) -> None:
        """An OOM on a batch of ``cost`` tokens: the budget becomes at most half of it."""
        new = max(MIN_BATCH_TOKENS, min(self.batch_tokens, int(cost) // 2))
        if new < self.batch_tokens:
            logger.warning("encode: out of memory on a batch of %d tokens; token budget lowered %d -> %d for the "
                           "rest of the run (encode.batch_tokens)", cost, self.batch_tokens, new)
            self.batch_tokens = new

    def as_dict(self) -> dict[str, Any]:
        return {"ooms": self.ooms, "retried_batches": self.retried_batches, "unfit_documents": self.unfit_documents,
                "batch_tokens": self.batch_tokens, "configured_batch_tokens": self.configured}


def _free_cached(e: BaseException) -> None:
    """Give the CUDA allocator's cached blocks back before retrying (a no-op on CPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort: the retry decides
        pass


def split_on_oom(run_one: Callable[[np.ndarray], Any], idx: np.ndarray, cost: Callable[[np.ndarray], int],
                 budget: OomBudget) -> Iterator[Any]:
    """``run_one(idx)``, or on an allocator failure the two halves of ``idx`` at half the budget,
    recursively; yields each successful sub-batch's result. A single window that fails raises
    :class:`WindowTooLarge`."""
    try:
        result = run_one(idx)
    except Exception as e:  # noqa: BLE001 - only allocator failures are handled, the rest re-raised
        if not is_allocator_failure(e):
            raise
        budget.ooms += 1
        _free_cached(e)
        if len(idx) == 1:
            raise WindowTooLarge(int(idx[0]), e) from e
        budget.lower(cost(idx))
        half = len(idx) // 2
        for part in (idx[:half], idx[half:]):
            budget.retried_batches += 1
            yield from split_on_oom(run_one, part, cost, budget)
        return
    yield result


def by_document(batches: Iterator[Any], window_doc: np.ndarray, budget: OomBudget) -> Iterator[Any]:
    """``batches`` with a :class:`WindowTooLarge` turned into :class:`DocumentTooLarge` (its document)."""
    try:
        yield from batches
    except WindowTooLarge as e:
        budget.unfit_documents += 1
        raise DocumentTooLarge(int(window_doc[e.window]), e.cause, budget.batch_tokens) from e.cause
