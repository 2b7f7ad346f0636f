"""FAISS index objects made from the recipe in :mod:`config`: an empty index with its build and
query parameters (``new_index``), IVF training (the coarse k-means on a GPU when allowed), exact
re-ranking around ``ivf_pq`` (``maybe_refine``) and the query-time parameters a loaded index gets
back (``set_search_params``). FAISS is imported inside the functions: it is slow to import and only
the building and searching need it."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from embedjob.stages.index.config import IndexConfig, factory_string

logger = logging.getLogger(__name__)


def _faiss_metric(metric: str) -> int:
    import faiss

    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def new_index(kind: str, dim: int, n: int, metric: str, cfg: IndexConfig):
    """An empty (untrained) FAISS index of ``kind`` with its build/search parameters set."""
    import faiss

    index = faiss.index_factory(dim, factory_string(kind, dim, n, cfg), _faiss_metric(metric))
    set_search_params(index, kind, cfg.hnsw_ef_search, cfg.ivf_nprobe)
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = cfg.hnsw_ef_construction
    return index


def set_search_params(index, kind: str, ef_search: Optional[int], nprobe: Optional[int],
                      k_factor: Optional[float] = None) -> None:
    """Apply the query-time parameters (they are also serialised with the index)."""
    import faiss

    if kind == "hnsw" and ef_search:
        faiss.downcast_index(index).hnsw.efSearch = int(ef_search)
    if kind.startswith("ivf"):
        base = index
        if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
            ref = faiss.downcast_index(index)
            if k_factor:
                ref.k_factor = float(k_factor)
            base = ref.base_index
        if nprobe:
            faiss.extract_index_ivf(base).nprobe = int(nprobe)


def _use_gpu(cfg: IndexConfig) -> bool:
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if cfg.use_gpu and gpus == 0:
        logger.warning("index.use_gpu=true but FAISS sees no GPU (faiss-cpu installed?): training on CPU")
    return bool(gpus) if cfg.use_gpu is None else bool(cfg.use_gpu and gpus)


def train_index(index, sample: np.ndarray, cfg: IndexConfig) -> None:
    """Train an IVF index on ``sample``; the coarse k-means runs on a GPU when allowed."""
    import faiss

    if index.is_trained:
        return
    ivf = faiss.extract_index_ivf(index)
    if _use_gpu(cfg):
        km = faiss.Kmeans(sample.shape[1], ivf.nlist, niter=20, seed=cfg.seed, gpu=True,
                          spherical=ivf.metric_type == faiss.METRIC_INNER_PRODUCT)
        km.train(sample)
        ivf.quantizer.add(km.centroids)  # a filled quantizer is not re-trained by IVF.train
        logger.info("index: coarse quantizer trained on GPU (%d clusters)", ivf.nlist)
    ivf.cp.seed = cfg.seed
    index.train(sample)


def maybe_refine(index, kind: str, cfg: IndexConfig, metric: str, parts: list[np.ndarray]):
    """Wrap an ivf_pq index in IndexRefineFlat (exact re-ranking) when refine_k_factor > 0."""
    import faiss

    if kind != "ivf_pq" or cfg.refine_k_factor <= 0:
        return index
    flat = faiss.IndexFlat(index.d, index.metric_type)
    for x in parts:  # in position order, as the IVF ids
        if len(x):
            flat.add(x)
    if flat.ntotal != index.ntotal:
        raise RuntimeError(f"refine vectors ({flat.ntotal}) and index ({index.ntotal}) disagree")
    refined = faiss.IndexRefine(index, flat)
    refined.k_factor = float(cfg.refine_k_factor)
    return refined
