"""Workers on one machine train one model in shared memory: each trainable matrix lives in a file
(on ``/dev/shm`` when it has room) that every worker of the machine maps, and they update it
lock-free, as gensim's own threads do on one model."""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import tempfile
from typing import Any, Optional

import numpy as np

from embedjob.stages.word2vec.model import trainable_arrays, trainable_slots

logger = logging.getLogger(__name__)


def memory_groups(machines: list[str]) -> list[list[int]]:
    """The ranks of each machine (``machines[rank]`` = its key, e.g. the node IP), in rank order;
    workers of one group can share one model in memory."""
    groups: dict[str, list[int]] = {}
    for rank, key in enumerate(machines):
        groups.setdefault(key, []).append(rank)
    return sorted(groups.values())


def shared_memory_dir(nbytes: int) -> Optional[str]:
    """A folder whose files can hold ``nbytes`` of shared model: ``/dev/shm`` (memory) if it has room,
    else the temporary folder (page cache, written back to disk now and then); None if neither."""
    for folder in ("/dev/shm", tempfile.gettempdir()):
        try:
            if os.path.isdir(folder) and shutil.disk_usage(folder).free > nbytes + (64 << 20):
                if folder != "/dev/shm":
                    logger.warning("word2vec: /dev/shm cannot hold the %.0f MB model; sharing it through %s",
                                   nbytes / 2**20, folder)
                return folder
        except OSError:
            continue
    return None


def share_arrays(model, paths: list[str], *, create: bool) -> None:
    """Back each of the model's :func:`trainable_slots` by the file ``paths[i]`` mapped into memory.
    ``create`` writes the model's current values to new files; otherwise the files (made by another
    process on this machine) are mapped as they are. Processes that map the same files train the same
    weights in place, lock-free, as gensim's threads do on one model."""
    for (owner, name), path in zip(trainable_slots(model), paths):
        arr = getattr(owner, name)
        if arr.nbytes == 0:
            continue
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, arr.nbytes)
            elif os.fstat(fd).st_size != arr.nbytes:
                raise RuntimeError(f"shared model file {path} has {os.fstat(fd).st_size} bytes, expected {arr.nbytes}")
            buf = mmap.mmap(fd, arr.nbytes)
        finally:
            os.close(fd)
        shared = np.frombuffer(buf, dtype=arr.dtype).reshape(arr.shape)
        if create:
            shared[...] = arr
        setattr(owner, name, shared)



def share_model(model, *, rank: int, world: int, run_id: str, ranks_per_machine: Optional[str] = None
                ) -> list[list[int]]:
    """Let the workers of each machine train one model in shared memory. Returns the groups of
    ranks that now share one model (a group of one = a worker with its own copy); every rank
    must call this (it runs collectives). ``ranks_per_machine`` (tests only) treats every that
    many consecutive ranks as one machine."""
    import ray  # heavy, and only ever needed inside a Ray Train worker
    import torch.distributed as dist

    key = ray.util.get_node_ip_address()
    if ranks_per_machine:
        key = f"{key}/{rank // int(ranks_per_machine)}"
    machines: list[Any] = [None] * world
    dist.all_gather_object(machines, key)
    groups = memory_groups(machines)
    mine = next(g for g in groups if rank in g)
    paths = None
    if rank == mine[0] and len(mine) > 1:
        folder = shared_memory_dir(sum(a.nbytes for a in trainable_arrays(model)))
        if folder is None:
            logger.warning("word2vec: no room for a shared model on this machine; its workers keep their own copies")
        else:
            paths = [os.path.join(folder, f"embedjob-w2v-{run_id}-{rank}-{i}")
                     for i in range(len(trainable_slots(model)))]
            share_arrays(model, paths, create=True)
    made: list[Any] = [None] * world
    dist.all_gather_object(made, paths)
    try:
        if rank != mine[0] and made[mine[0]] is not None:
            try:
                share_arrays(model, made[mine[0]], create=False)
            except OSError as e:
                raise RuntimeError(
                    f"word2vec worker {rank} cannot map the shared model that worker {mine[0]} made on the same "
                    f"machine ({e}); set word2vec.share_memory: false") from e
        dist.barrier()
    finally:
        for path in paths or []:  # every worker has mapped them: the memory lives until the last unmaps it
            if os.path.exists(path):
                os.remove(path)
    return [g2 for g in groups for g2 in ([g] if made[g[0]] is not None else [[r] for r in g])]
