"""Is the encoder fed? Each encoder actor splits its time into *waiting* for its next block (from
the end of one call to the start of the next, and from being ready to its first call) and
*computing* (inside a call); "encoder busy" is computing / (computing + waiting) over all actors.

Below :data:`FEED_BOUND` the encoder waits on the CPU stages before it (read, preprocess,
tokenize): the job is feed-bound, and one line says so with the remedy. On a cluster with GPUs,
:func:`feed_plan` sizes the CPU preprocessing per GPU from measured rates. Example::

    clock = BusyClock()
    clock.arrive(); ...; clock.leave()            # around each call
    busy_fraction(wait_s=3.0, busy_s=7.0)         # 0.7
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Optional

FEED_BOUND = 0.8  # encoder busy below this: feed-bound

# CPU-seconds per million encoded tokens of the work around the model (read, gensim preprocess,
# tokenize, alignment, write, commit, Ray Data), measured by `embedjob bench feed` with the start-up
# taken out (README "CPU cores per GPU", "Sixth pass": 1.27-1.75 with static vectors and 0.85-1.12
# without, over mixed-en's first 4 shards and its short- and long-document subsets); the larger ends,
# the plan's default when a job has no measurement of its own.
FEED_CPU_S_PER_MTOK = {"static": 1.75, "plain": 1.1}
# Of that, the CPU-seconds per million tokens an encoder actor spends outside the model's forward, on
# its one Python thread (window plan, batches, pooling bookkeeping, Arrow in and out; with static
# vectors the accumulation): `bench feed`'s "encoder actors" line, start-up out, the largest of the
# same three runs (0.39-0.57 and 0.20-0.28, padded batches). One actor can feed its GPU at most 1e6 /
# this tokens per second, whatever the CPUs around it.
ACTOR_CPU_S_PER_MTOK = {"static": 0.57, "plain": 0.28}
# Those rates are the bench's 32-dimension model's. With static vectors the work grows with the
# model's width (each call's word sums, their staged parts and the commit's merge are `dim` floats per
# word): CPU-seconds per million tokens per dimension above FEED_WIDTH, for the whole job and for the
# encoder actor's thread, fitted by `embedjob bench feed --widths 32,384,768` (README "Seventh pass").
# Measured on CPU, where the accumulator's sums also run on the CPU (on a GPU they run on the device):
# an upper bound for the actor.
FEED_WIDTH = 32
STATIC_CPU_S_PER_MTOK_PER_DIM = {"feed": 0.0031, "actor": 0.0012}
# Encoder rates on one H200 (docs/gpu-check-h200.md), tokens/s, by hidden size.
GPU_TOKENS_PER_S = {384: 9.3e6, 768: 2.2e6}


class BusyClock:
    """An encoder actor's waiting and computing seconds (``time.monotonic``)."""

    def __init__(self) -> None:
        self.last_end = time.monotonic()  # ready: waiting for the first block starts now
        self.wait_s = 0.0
        self.busy_s = 0.0
        self._start: Optional[float] = None

    def arrive(self) -> None:
        """A block arrived: the wait since the last call ends."""
        self._start = time.monotonic()
        self.wait_s += self._start - self.last_end

    def leave(self) -> tuple[float, float]:
        """The call is done; returns the (wait, busy) seconds of this call."""
        now = time.monotonic()
        start = self._start if self._start is not None else now
        wait = start - self.last_end
        busy = now - start
        self.busy_s += busy
        self.last_end, self._start = now, None
        return wait, busy


def busy_fraction(wait_s: float, busy_s: float) -> Optional[float]:
    """Computing / (computing + waiting); None before anything was measured."""
    total = wait_s + busy_s
    return busy_s / total if total > 0 else None


def busy_text(fraction: Optional[float]) -> str:
    """``encoder busy 87%`` for the progress line and the report ("" before any measurement)."""
    return "" if fraction is None else f"encoder busy {100 * fraction:.0f}%"


@dataclasses.dataclass
class PoolPlan:
    """The encoder actor pool as planned for the cluster (:func:`embedjob.cluster.plan_encoder`):
    device, actor count, Ray resources and torch threads per actor, the preprocess tasks at once
    (``None``: Ray's default) and, on GPUs, the feed plan (``busy.feed_plan``'s figures). Recorded in
    the manifest as ``encoder.actors``."""

    device: str
    actors: int
    num_gpus: float  # per actor: 1 / encode.actors_per_gpu on GPUs, 0 on CPUs
    num_cpus: float
    threads: int
    resources: Optional[dict] = None  # custom Ray resources per actor (encode.resources)
    preprocess_concurrency: Optional[int] = None
    feed: Optional[dict] = None

    def as_dict(self) -> dict:
        """The manifest's form: unset resources and feed left out."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None or k == "preprocess_concurrency"}


def feed_bound_line(fraction: Optional[float], plan: PoolPlan) -> Optional[str]:
    """The one line that says the encoder waits on its input, with the remedy; None when busy."""
    if fraction is None or fraction >= FEED_BOUND:
        return None
    where = "GPU" if plan.device == "cuda" else "encoder actor"
    return (f"encode: the encoder is feed-bound ({busy_text(fraction)}, below {100 * FEED_BOUND:.0f}%): it waits on "
            f"read/preprocess/tokenize; give each {where} more CPUs (more CPUs per GPU on the nodes), or raise "
            f"encode.preprocess_concurrency (now {plan.preprocess_concurrency or 'Ray default'})")


def feed_plan(gpus: int, cpus: int, hidden_size: Optional[int], *, static: bool,
              cpu_s_per_mtok: Optional[float] = None, gpu_tokens_per_s: Optional[float] = None,
              actors_per_gpu: int = 1, actor_cpu_s_per_mtok: Optional[float] = None) -> dict[str, Any]:
    """CPU preprocessing per GPU: the CPUs that keep one GPU busy (its encoder rate x the CPU
    seconds per token of the work around the model), what the cluster has per GPU, and the
    preprocess tasks to run at once (all the CPUs the encoder actors leave free, at most what
    the GPUs need); and what the encoder actors' own threads can feed one GPU (``actors_per_gpu``
    x 1e6 / their CPU seconds per million tokens outside the model), with the actors per GPU that
    keep it busy. Rates default to the measured ones (:data:`FEED_CPU_S_PER_MTOK`,
    :data:`ACTOR_CPU_S_PER_MTOK`, :data:`GPU_TOKENS_PER_S`), with static vectors grown to the model's
    width (:data:`STATIC_CPU_S_PER_MTOK_PER_DIM`)."""
    kind = "static" if static else "plain"
    rate = gpu_tokens_per_s or GPU_TOKENS_PER_S.get(int(hidden_size or 0)) or GPU_TOKENS_PER_S[768]
    wider = max(int(hidden_size or 768) - FEED_WIDTH, 0) if static else 0  # unknown width: BERT-base's, as the rate
    cost = cpu_s_per_mtok or FEED_CPU_S_PER_MTOK[kind] + wider * STATIC_CPU_S_PER_MTOK_PER_DIM["feed"]
    actor_cost = actor_cpu_s_per_mtok or ACTOR_CPU_S_PER_MTOK[kind] + wider * STATIC_CPU_S_PER_MTOK_PER_DIM["actor"]
    need = rate * cost / 1e6  # CPUs that keep one GPU busy
    actors = max(gpus, 1) * actors_per_gpu
    have = (cpus - actors) / max(gpus, 1)  # one CPU per encoder actor
    tasks = max(1, min(cpus - actors, int(math.ceil(need * max(gpus, 1)))))
    actor_feed = actors_per_gpu * 1e6 / actor_cost  # tokens/s the actors of one GPU can hand it
    busy = min(1.0, have / need if need > 0 else 1.0, actor_feed / rate)
    return {"cpus_per_gpu_needed": round(need, 1), "cpus_per_gpu": round(have, 1),
            "gpu_tokens_per_s": rate, "cpu_s_per_mtok": cost, "preprocess_concurrency": tasks,
            "actor_cpu_s_per_mtok": actor_cost, "actors_per_gpu": actors_per_gpu,
            "actors_feed_tokens_per_s": round(actor_feed), "actors_per_gpu_needed": math.ceil(rate * actor_cost / 1e6),
            "expected_busy": round(max(busy, 0.0), 2)}
