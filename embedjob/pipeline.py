"""The one place that sequences the stages of a job.

``run_job(cfg)``:

1. check the inputs and the model on the driver (errors before any Ray work), then take the
   output's lease (a second run on the same output stops here, see ``lease.py``);
2. start or join Ray;
3. per-shard stages as one streaming Ray Data pipeline
   read -> preprocess (gensim tokens + BERT token ids) -> encode (actor pool) -> staged write,
   committing each shard as soon as all its rows are written; shards whose committed outputs
   match (same input fingerprint, same config and model) are skipped;
4. corpus-wide stages from the per-shard outputs: vocabulary, static word vectors, Word2Vec,
   topic model, indices — each rerun only when its inputs or settings changed, and each writing
   its results only after it succeeded;
5. ``manifest.json`` last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from embedjob import __version__
from embedjob.config import JobConfig
from embedjob.encode import resolve_encoder_settings
from embedjob.errors import JobError, root_cause
from embedjob.layout import DONE, SUPERSEDED, TMP, TOKENS_DIR, VECTORS
from embedjob.lease import OutputLease
from embedjob.models import check_model, model_fingerprint
from embedjob.progress import Progress
from embedjob.read import InputError, ShardInfo, check_ids, discover_shards
from embedjob.reconcile import (
    is_intact,
    list_shard_files,
    read_shard_markers,
    reconcile_outputs,
)
from embedjob.redact import redact, redact_url
from embedjob.storage import Storage
from embedjob.vocab import build_vocabulary, write_dictionary
from embedjob.write import read_marker

logger = logging.getLogger(__name__)


@dataclass
class JobResult:
    output_url: str
    manifest: dict[str, Any]
    failed_shards: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed_shards


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "embedjob": __version__}
    for pkg in ("ray", "torch", "transformers", "gensim", "pyarrow", "fsspec", "s3fs", "faiss-cpu", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def init_ray(cfg: JobConfig) -> dict[str, Any]:
    """Join the cluster at ``ray.address`` / ``RAY_ADDRESS``, else start a local Ray in-process."""
    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        mode = "existing"
    elif address:
        ray.init(address=address, log_to_driver=True)
        mode = f"cluster {address}"
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
        mode = "local"
    res = ray.cluster_resources()
    logger.info("ray: %s, %d CPUs, %d GPUs, %d nodes", mode, int(res.get("CPU", 0)), int(res.get("GPU", 0)),
                len([n for n in ray.nodes() if n.get("Alive")]))
    return {"mode": mode, "resources": {k: v for k, v in res.items() if not k.startswith("node:")}}


def plan_encoder(cfg: JobConfig, resources: dict[str, float]) -> dict[str, Any]:
    """Device, actor count, CPUs and threads of the encoder actor pool, from config and cluster.

    ``resources`` is ``ray.cluster_resources()``: one GPU actor per GPU, else CPU actors (with a
    log line saying so). ``encode.resources`` (custom Ray resources per actor) caps the actor
    count at what the cluster holds, unless ``encode.actors`` is set (an autoscaler may add the
    nodes that hold them)."""
    e = cfg.encode
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if e.device == "cuda" and gpus == 0:
        if not e.actors:
            raise JobError("encode.device=cuda but the Ray cluster has no GPUs (set encode.device=auto or cpu, "
                           "or encode.actors=N to wait for an autoscaler to add N GPU workers)")
        logger.warning("encode: the cluster has no GPUs yet; asking for %d GPU actor(s), to be placed when the "
                       "autoscaler adds GPU nodes", e.actors)
    device = "cuda" if (e.device == "auto" and gpus > 0) or e.device == "cuda" else "cpu"
    if e.actors:
        actors = e.actors
    elif device == "cuda":
        actors = gpus
    else:
        actors = max(1, int(cpus // max(e.cpus_per_actor, 1) // 2) or 1)
    if e.resources:
        fit = min(int(resources.get(k, 0) // v) if v > 0 else actors for k, v in e.resources.items())
        if fit == 0 and not e.actors:
            raise JobError(f"encode.resources={dict(e.resources)} asks for resources the Ray cluster does not hold "
                           f"(its custom resources: {_custom_resources(resources)}); start nodes with "
                           "`ray start --resources`, or set encode.actors to wait for an autoscaler to add them")
        if fit < actors and e.actors:
            logger.warning("encode: encode.resources=%s fits %d of the %d actors (encode.actors) now; the rest "
                           "wait for nodes that hold them", dict(e.resources), fit, actors)
        elif fit < actors:
            actors = fit
    if device == "cuda":
        plan = {"device": "cuda", "actors": actors, "num_gpus": 1, "num_cpus": e.cpus_per_actor,
                "threads": e.threads_per_actor or 2}
        logger.info("encode: %d GPU actor(s), one per GPU (num_gpus=1)", actors)
    else:
        threads = e.threads_per_actor or max(1, cpus // actors)
        num_cpus = e.cpus_per_actor
        if actors * num_cpus > cpus - 1:  # leave a CPU for the read/preprocess/write tasks
            num_cpus = max(0.1, (cpus - 1) / actors) if cpus > 1 else 0.5
            logger.info("encode: %d CPU(s) in the cluster: each encoder actor reserves %.2f CPU so the read "
                        "and write tasks can run beside it", cpus, num_cpus)
        plan = {"device": "cpu", "actors": actors, "num_gpus": 0, "num_cpus": num_cpus, "threads": threads}
        if e.device == "auto":
            logger.info("encode: no GPUs in the cluster, encoding with %d CPU actor(s) x %d threads", actors, threads)
        else:
            logger.info("encode: %d CPU actor(s) x %d threads (encode.device=cpu)", actors, threads)
    if e.resources:
        plan["resources"] = dict(e.resources)
        logger.info("encode: each encoder actor asks for Ray resources %s", dict(e.resources))
    return plan


def _custom_resources(resources: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in resources.items()
            if not k.startswith("node:") and k not in ("CPU", "GPU", "memory", "object_store_memory")}


def shard_stage_hash(cfg: JobConfig, encoder: dict[str, Any]) -> str:
    """What per-shard outputs depend on: preprocessing, encoder settings and model, static options."""
    enc = {k: encoder[k] for k in ("model_fingerprint", "pooling", "normalize", "max_length", "recipe")}
    enc["dtype"] = encoder["dtype"]
    static = cfg.static.model_dump() if cfg.static.enabled else None
    return _hash({"preprocess": cfg.preprocess.model_dump(), "encoder": enc, "static": static,
                  "id": cfg.input.id_column, "text": cfg.input.text_column, "empty": cfg.input.on_empty_text})


def run_job(cfg: JobConfig, *, dry_run: bool = False, echo: Callable[[str], None] = print) -> Optional[JobResult]:
    """Run every stage of ``cfg``; ``manifest.json`` is written whether the job succeeds or fails
    (with ``status`` and ``error``), and always describes exactly the files in the output."""
    t_start = time.time()
    inp = cfg.input
    # 1. checks before any Ray work
    shards = discover_shards(inp.url, inp.storage_options, inp.id_column, inp.text_column,
                             on_bad_shard=inp.on_bad_shard)
    id_stats = check_ids(shards, inp.storage_options, inp.id_column, on_bad_shard=inp.on_bad_shard,
                         on_duplicate_id=inp.on_duplicate_id)
    bad = [s for s in shards if s.error]
    if len(bad) == len(shards):
        raise InputError(f"no readable shard at {redact_url(inp.url)!r}: " + "; ".join(s.error or "" for s in bad))
    check_model(cfg.encode.model)  # a folder that would only fail in the encoder actors fails here
    encoder = resolve_encoder_settings(cfg.encode)
    encoder["model_fingerprint"] = model_fingerprint(encoder["model_path"])
    out = Storage(cfg.output.url, cfg.output.storage_options)
    if dry_run:
        _echo_dry_run(cfg, shards, id_stats, echo)
        return None
    with OutputLease(out, timeout_s=cfg.output.lease_timeout_s, force=cfg.output.force_unlock) as lease:
        return _run_leased(cfg, out, shards, id_stats, encoder, lease, t_start)


def _run_leased(cfg: JobConfig, out: Storage, shards: list[ShardInfo], id_stats: dict[str, Any],
                encoder: dict[str, Any], lease: OutputLease, t_start: float) -> JobResult:
    """The job's work, while this run holds the output's lease (one writer at a time, lease.py)."""
    inp, bad, run_id = cfg.input, [s for s in shards if s.error], lease.run_id
    ray_info = init_ray(cfg)
    plan = plan_encoder(cfg, ray_info["resources"])
    if plan["device"] == "cuda":
        encoder["dtype"] = resolve_encoder_settings(cfg.encode, "cuda")["dtype"]
    encoder["device"] = plan["device"]
    stage_hash = shard_stage_hash(cfg, encoder)

    # 2. which shards need work: a committed shard is skipped when its input, recipe and files are intact
    previous = read_shard_markers(out)
    files = list_shard_files(out)
    todo: list[ShardInfo] = []
    status: dict[str, dict[str, Any]] = {}
    for s in shards:
        if s.error:
            status[s.key] = {"status": "failed", "url": s.url, "reason": s.error}
            continue
        marker = None if cfg.output.overwrite else previous.get(s.key)
        if (marker and marker.get("input") == s.fingerprint() and marker.get("stage_hash") == stage_hash
                and is_intact(marker, files, s.key)):
            status[s.key] = {"status": "skipped-unchanged", "url": s.url, "rows": marker.get("rows_out"),
                             "marker": marker}
        else:
            todo.append(s)
    logger.info("shards: %d to process, %d unchanged, %d bad", len(todo),
                sum(1 for v in status.values() if v["status"] == "skipped-unchanged"), len(bad))

    stages: dict[str, Any] = {}
    error: Optional[Exception] = None
    t0 = time.time()
    try:
        processed, failures, shard_stats = run_shard_stages(cfg, out, todo, encoder, plan, stage_hash)
    except (JobError, InputError) as e:  # what was committed before the failure is kept and recorded
        error, processed, failures = e, getattr(e, "committed", {}), {}
        shard_stats = {"error": str(e)}
    for key, marker in processed.items():
        status[key] = {"status": "done", "url": marker["input"]["url"], "rows": marker["rows_out"], "marker": marker}
    for key, reason in failures.items():
        status[key] = {"status": "failed", "url": next(s.url for s in shards if s.key == key), "reason": reason}
    for s in todo:
        if s.key not in status:  # not reached: the job stopped first
            status[s.key] = {"status": "failed", "url": s.url, "reason": f"not processed: the job stopped ({error})"}
    shard_stats["seconds"] = round(time.time() - t0, 3)
    stages["encode"] = shard_stats

    # 3. one recipe in the output: keep what this run vouches for, move the rest aside
    keep, reasons = _outputs_to_keep(cfg, status, previous, stage_hash)
    lease.check()  # another run took the output over: move nothing, leave the manifest to it
    superseded = reconcile_outputs(out, keep=keep, markers=previous, reasons=reasons, run_id=run_id)
    committed = sorted(keep)
    if error is None:
        for name in ("read", "preprocess", "encode"):
            out.write_json(f"stats/{name}.json", _stage_stats(name, status, shard_stats))

        # 4. corpus-wide stages over every kept shard
        token_urls = [out.url(f"{TOKENS_DIR}/{k}.parquet") for k in committed]
        vector_urls = [out.url(f"{VECTORS}/{k}.parquet") for k in committed]
        fingerprints = {k: keep[k].get("input") for k in committed}
        inputs_hash = {  # what corpus-wide stages read: token files (preprocessing) or vector files (+ encoder)
            "tokens": _hash({"shards": fingerprints, "preprocess": cfg.preprocess.model_dump(),
                             "columns": [inp.id_column, inp.text_column], "empty": inp.on_empty_text}),
            "vectors": _hash({"shards": fingerprints, "stage": stage_hash}),
        }
        try:
            run_corpus_stages(cfg, out, token_urls, vector_urls, committed, encoder, inputs_hash, stages=stages)
        except JobError as e:
            error = e

    failed = sorted(k for k, v in status.items() if v["status"] == "failed")
    lease.check()  # another run took the output over: leave the manifest to it
    manifest = {
        "embedjob_version": __version__,
        "job": cfg.name,
        "run_id": run_id,
        "status": "failed" if error is not None else ("partial" if failed else "ok"),
        **({"error": str(error)} if error is not None else {}),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": round(time.time() - t_start, 3),
        "config": redact(cfg.model_dump(mode="json")),
        "versions": package_versions(),
        "ray": ray_info,
        "encoder": {**encoder, "actors": plan},
        "recipe": stage_hash,
        "input": {
            "url": redact_url(inp.url), "id_column": inp.id_column, "text_column": inp.text_column,
            "storage_options": redact(inp.storage_options),
            "shards": {s.key: redact_url(s.url) for s in shards},
            "ids": id_stats,
        },
        "shards": {k: {kk: vv for kk, vv in v.items() if kk != "marker"} | _marker_summary(v.get("marker"))
                   for k, v in sorted(status.items())},
        "totals": {
            "shards": len(shards), "done": sum(1 for v in status.values() if v["status"] == "done"),
            "skipped_unchanged": sum(1 for v in status.values() if v["status"] == "skipped-unchanged"),
            "kept_not_in_input": sum(1 for v in status.values() if v["status"] == "kept-not-in-input"),
            "failed": len(failed),
            "committed_shards": len(committed),
            # rows in the output's per-shard files: exactly what a reader that globs vectors/ gets
            "rows_out": sum(int(keep[k].get("rows_out") or 0) for k in committed),
        },
        "superseded": superseded,
        "stages": stages,
        "outputs": {"vectors": VECTORS + "/", "tokens": TOKENS_DIR + "/", "stats": "stats/", "markers": DONE + "/",
                    "superseded": SUPERSEDED + "/"},
    }
    out.write_json("config.json", redact(cfg.model_dump(mode="json")))
    out.write_json("manifest.json", manifest)  # written last, on success and on failure
    if error is not None:
        logger.error("failed after %.1fs; manifest.json records what was committed (%d shards)",
                     time.time() - t_start, len(committed))
        raise error
    logger.info("done in %.1fs: %d shards committed (%d new), %d failed; output %s", time.time() - t_start,
                len(committed), manifest["totals"]["done"], len(failed), out.url())
    return JobResult(out.url(), manifest, failed)


def _echo_dry_run(cfg: JobConfig, shards: list[ShardInfo], id_stats: dict[str, Any], echo: Callable[[str], None]) -> None:
    """``--dry-run``: the resolved config (secrets masked) and what would be read and written."""
    import yaml

    echo("# resolved job config")
    echo(yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False).rstrip())
    echo(f"# {len(shards)} shard(s), {sum(s.num_rows for s in shards)} rows"
         + (f", {id_stats['duplicate_rows']} duplicate id row(s)" if id_stats.get("duplicate_rows") else ""))
    for s in shards:
        echo(f"{redact_url(s.url)}\t{s.num_rows} rows\t-> {VECTORS}/{s.key}.parquet" + (f"\tBAD: {s.error}" if s.error else ""))


def _outputs_to_keep(cfg: JobConfig, status: dict[str, dict[str, Any]], previous: dict[str, dict[str, Any]],
                     stage_hash: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``({shard: marker} whose files stay, {shard: why its earlier commit is moved aside})``.

    Kept: shards committed by this run or unchanged; a shard whose reprocessing failed keeps an
    earlier commit of the same recipe; a shard no longer in the input keeps one only with
    ``output.removed_shards=keep``. Updates ``status`` for the shards kept that way."""
    keep: dict[str, dict[str, Any]] = {}
    reasons: dict[str, str] = {}
    for key, v in status.items():
        if v["status"] in ("done", "skipped-unchanged"):
            keep[key] = v["marker"]
    for key, old in previous.items():
        if key in keep:
            continue
        same_recipe = old.get("stage_hash") == stage_hash
        if key in status:  # in the input, failed this run
            if same_recipe:
                keep[key] = old
                status[key].update(previous_commit="kept", rows=old.get("rows_out"), marker=old)
            else:
                reasons[key] = "the shard failed and its earlier commit is of another recipe"
        elif same_recipe and cfg.output.removed_shards == "keep":
            keep[key] = old
            status[key] = {"status": "kept-not-in-input", "url": (old.get("input") or {}).get("url"),
                           "rows": old.get("rows_out"), "marker": old}
        else:
            reasons[key] = ("not in the input (output.removed_shards=move)" if same_recipe
                            else "not in the input, another recipe")
    return keep, reasons


def _marker_summary(marker: Optional[dict[str, Any]]) -> dict[str, Any]:
    if not marker:
        return {}
    keys = ("rows_in", "rows_out", "empty_text", "skipped_empty", "bert_tokens", "words", "outputs")
    return {k: marker[k] for k in keys if k in marker}


def _stage_stats(name: str, status: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    done = [v["marker"] for v in status.values() if v["status"] == "done"]
    base = {"stage": name, "shards_processed": len(done),
            "shards_skipped_unchanged": sum(1 for v in status.values() if v["status"] == "skipped-unchanged"),
            "shards_failed": sum(1 for v in status.values() if v["status"] == "failed")}
    if name == "read":
        base["rows"] = sum(m["rows_in"] for m in done)
    elif name == "preprocess":
        base["rows"] = sum(m["rows_in"] for m in done)
        base["empty_text"] = sum(m["empty_text"] for m in done)
        base["skipped_empty"] = sum(m["skipped_empty"] for m in done)
        base["gensim_tokens"] = sum(m["words"] for m in done)
    else:
        base.update(stats)
    return base


BLOCK_BYTES = 4 * 1024 * 1024  # Ray Data target block size of the per-shard pipeline


# -- per-shard stages: one streaming Ray Data pipeline ------------------------------------------
def run_shard_stages(cfg: JobConfig, out: Storage, todo: list[ShardInfo], encoder: dict[str, Any],
                     plan: dict[str, Any], stage_hash: str):
    """read -> preprocess -> encode -> staged write, committing shards as they complete.

    Returns (markers of committed shards, {shard: failure reason}, encode stats)."""
    import numpy as np
    import ray
    from ray.data import DataContext

    from embedjob.encode import EncodeActor
    from embedjob.preprocess import preprocess_batch
    from embedjob.read import ShardDatasource
    from embedjob.write import commit_shard, write_block

    stats: dict[str, Any] = {"documents": 0, "bert_tokens": 0, "actors": plan["actors"], "device": plan["device"],
                             "dtype": encoder["dtype"], "actor_nodes": {}}
    if not todo:
        return {}, {}, stats
    inp = cfg.input
    for s in todo:  # leftovers of an interrupted run are never mixed with new parts
        out.delete(f"{TMP}/{s.key}", recursive=True)

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.execution_options.preserve_order = False
    # Ray Data merges a task's outputs until they reach target_max_block_size (128 MiB by default),
    # which would turn a whole shard into one block: one actor call per shard, no progress until it
    # is done, a retry redoing it all and actor memory growing with the shard. A few MiB keeps
    # blocks at hundreds to a few thousand rows (input.rows_per_block is the most a read yields).
    ctx.target_max_block_size = min(ctx.target_max_block_size or BLOCK_BYTES, BLOCK_BYTES)
    # A UDF's own error (InputError naming shard, row and id) reaches the driver as itself, not as
    # "UDF failed to process a data block" with the cause only in Ray's logs.
    ctx.raise_original_map_exception = True
    static = None
    if cfg.static.enabled:
        from embedjob.static_vectors import static_actor_settings

        static = static_actor_settings(cfg, out)

    ds = ray.data.read_datasource(
        ShardDatasource.create(todo, inp.storage_options, inp.id_column, inp.text_column, inp.rows_per_block,
                               on_bad_shard=inp.on_bad_shard, out_url=out.url(), out_options=out.storage_options),
        override_num_blocks=len(todo),
    )
    ds = ds.map_batches(
        preprocess_batch, fn_kwargs={
            "cfg": cfg.preprocess, "text_column": inp.text_column, "encoder_settings": encoder,
            "static_settings": static, "on_empty_text": inp.on_empty_text, "id_column": inp.id_column},
        batch_format="pyarrow", batch_size=None, zero_copy_batch=True, compute=ray.data.TaskPoolStrategy(),
    )
    actor_args = {"max_restarts": cfg.encode.max_restarts, "max_task_retries": cfg.encode.max_task_retries}
    if plan.get("resources"):
        actor_args["resources"] = plan["resources"]
    ds = ds.map_batches(
        EncodeActor,
        fn_constructor_kwargs={"settings": encoder, "batch_tokens": cfg.encode.batch_tokens_for(encoder["device"]),
                               "max_batch_docs": cfg.encode.max_batch_docs, "num_threads": plan["threads"],
                               "static": static},
        batch_format="pyarrow", batch_size=cfg.encode.rows_per_call, zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
        num_gpus=plan["num_gpus"] or None, num_cpus=plan["num_cpus"], **actor_args,
    )
    ds = ds.map_batches(
        write_block, fn_kwargs={"out_url": out.url(), "storage_options": out.storage_options,
                                            "id_column": inp.id_column},
        batch_format="pyarrow", batch_size=None, zero_copy_batch=True, compute=ray.data.TaskPoolStrategy(),
    )

    commit = ray.remote(num_cpus=0.25, max_retries=3)(commit_shard)
    by_key = {s.key: s for s in todo}
    covered = {s.key: np.zeros(s.num_rows, dtype=bool) for s in todo}
    pending: dict[str, Any] = {}
    markers: dict[str, Any] = {}
    failures: dict[str, str] = {}
    total_rows = sum(s.num_rows for s in todo)
    progress = Progress("encode", total=total_rows, unit="docs")

    def submit(key: str) -> None:
        s = by_key[key]
        marker = {"input": s.fingerprint(), "stage_hash": stage_hash, "encoder": {
            k: encoder[k] for k in ("model", "model_fingerprint", "pooling", "normalize", "max_length", "dtype")}}
        pending[key] = commit.remote(out.url(), out.storage_options, key, s.num_rows, inp.on_empty_text, marker,
                                     encoder.get("dim"))

    for s in todo:
        if s.num_rows == 0:
            submit(s.key)
    first_output: Optional[float] = None  # steady-state rate: from the first written block to the last
    tokens_after_first = 0
    try:
        for rep in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            now = time.time()
            if first_output is None:
                first_output = now
            else:
                tokens_after_first += int(sum(rep.column("tokens").to_pylist()))
            last_output = now
            for r in rep.to_pylist():
                cov = covered[r["shard"]]
                new = int((~cov[r["row_start"]: r["row_end"] + 1]).sum())
                cov[r["row_start"]: r["row_end"] + 1] = True
                stats["documents"] += new
                stats["bert_tokens"] += r["tokens"] if new else 0
                if r.get("rss_mb") and r["rss_mb"] > stats.get("encoder_peak_rss_mb", 0.0):
                    # peak RSS of the encoder actors and when it grew: [documents done, MiB]
                    stats["encoder_peak_rss_mb"] = r["rss_mb"]
                    stats.setdefault("encoder_rss_growth", []).append([stats["documents"], r["rss_mb"]])
                if new and r.get("node"):  # documents encoded per Ray node (where the actors ran)
                    stats["actor_nodes"][r["node"]] = stats["actor_nodes"].get(r["node"], 0) + new
                progress.update(new, tokens=r["tokens"] if new else 0,
                                extra=f"{len(markers) + len(pending)}/{len(todo)} shards written")
                if new and cov.all() and r["shard"] not in pending:
                    submit(r["shard"])
    except Exception as e:  # noqa: BLE001 - surface the user's error, keep what was committed
        _settle(pending, markers, failures)
        cause = _root_cause(e)
        if isinstance(cause, InputError) and cause.shard in by_key:  # a Ray task knew only the shard's key
            cause = cause.naming(by_key[cause.shard].url)
        if isinstance(cause, InputError) and inp.on_bad_shard == "fail":
            cause.committed = dict(markers)  # type: ignore[attr-defined] - run_job records and keeps them
            raise cause from None
        err = JobError(f"encode stage failed ({len(markers)} shard(s) committed before the failure): {cause}")
        err.committed = dict(markers)  # type: ignore[attr-defined]
        raise err from e
    _settle(pending, markers, failures)
    progress.close()
    for s in todo:  # shards whose reads failed under on_bad_shard=skip
        if s.key not in markers and s.key not in failures:
            reason = _failure_reason(out, s.key) or "not all rows were encoded"
            failures[s.key] = reason
            logger.error("shard %s failed: %s", s.url, reason)
    for key in failures:  # the reason is in the manifest; a rerun starts the shard afresh anyway
        out.delete(f"{TMP}/{key}", recursive=True)
    if out.protocol == "file" and out.exists(TMP) and not out.fs.ls(out.path(TMP)):
        out.fs.rmdir(out.path(TMP))
    if first_output is not None and last_output > first_output:
        stats["steady_tokens_per_second"] = round(tokens_after_first / (last_output - first_output), 1)
    stats["docs_per_second"] = round(stats["documents"] / max(progress.elapsed, 1e-9), 1)
    stats["tokens_per_second"] = round(stats["bert_tokens"] / max(progress.elapsed, 1e-9), 1)
    return markers, failures, stats


def _settle(pending: dict[str, Any], markers: dict[str, Any], failures: dict[str, str]) -> None:
    import ray

    for key, ref in list(pending.items()):
        try:
            markers[key] = ray.get(ref)
        except Exception as e:  # noqa: BLE001
            failures[key] = f"commit failed: {_root_cause(e)}"
        del pending[key]


def _failure_reason(out: Storage, key: str) -> Optional[str]:
    try:
        return out.read_json(f"{TMP}/{key}/_FAILED.json").get("reason")
    except (FileNotFoundError, OSError, ValueError):
        return None


def _root_cause(e: BaseException) -> BaseException:
    """The user-facing error inside Ray's wrappers (RayTaskError, UserCodeException, Ray Train's),
    with a one-line message (:func:`embedjob.errors.root_cause`)."""
    return root_cause(e)


# -- corpus-wide stages ------------------------------------------------------------------------
def run_corpus_stages(cfg: JobConfig, out: Storage, token_urls: list[str], vector_urls: list[str],
                      committed: list[str], encoder: dict[str, Any], inputs_hash: dict[str, str],
                      stages: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Vocabulary, static vectors, Word2Vec, topics and indices, each skipped when its inputs and
    settings are unchanged since its last success (recorded in ``_done/stage-<name>.json``).

    Each stage's stats are added to ``stages`` as it ends, so a later stage's failure leaves the
    earlier ones on record."""
    stages = {} if stages is None else stages
    if not committed:
        logger.warning("no committed shard: corpus-wide stages skipped")
        return stages

    def stage(name: str, settings: Any, fn: Callable[[], dict[str, Any]], deps: tuple[str, ...] = (),
              reads: str = "tokens") -> None:
        """Run one stage unless its inputs (token or vector files), its settings and the stages it
        reads are unchanged."""
        key = _hash({"inputs": inputs_hash[reads], "settings": settings,
                     "deps": {d: stages[d].get("hash") for d in deps if d in stages}})
        prev = None if cfg.output.overwrite else read_marker(out, f"stage-{name}")
        if prev and prev.get("hash") == key:
            logger.info("%s: unchanged since its last run, kept", name)
            stages[name] = {**prev.get("stats", {}), "status": "skipped-unchanged", "hash": key}
            return
        t = time.time()
        logger.info("%s: started", name)
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - name the stage; earlier results stay as they were
            raise JobError(f"{name} stage failed: {_root_cause(e)} (the outputs of its last successful run, "
                           "if any, are untouched)") from e
        result = {**result, "seconds": round(time.time() - t, 3)}
        out.write_json(f"stats/{name}.json", result)
        out.write_json(f"{DONE}/stage-{name}.json", {"hash": key, "stats": result})
        stages[name] = {**result, "status": "done", "hash": key}
        logger.info("%s: done in %.1fs", name, time.time() - t)

    def vocab() -> dict[str, Any]:
        d = build_vocabulary(token_urls, out.storage_options)
        write_dictionary(out, d)
        return {"words": len(d), "documents": d.num_docs, "tokens": d.num_pos}

    stage("vocab", cfg.preprocess.model_dump(), vocab)
    if cfg.static.enabled:
        from embedjob.static_vectors import run_static

        stage("static", cfg.static.model_dump(), lambda: run_static(cfg, out, committed), deps=("vocab",),
              reads="vectors")
    if cfg.word2vec.enabled:
        from embedjob.word2vec import run_word2vec

        # Settings that cannot change the vectors (restarts, Ray's folder, trusting a pickle) do not rerun the stage.
        stage("word2vec", cfg.word2vec.model_dump(exclude={"max_failures", "ray_storage_path", "init_trust_pickle"}),
              lambda: run_word2vec(cfg, out, token_urls), deps=("vocab",))
    if cfg.topics.enabled:
        from embedjob.stages.topics.stage import run_topics

        stage("topics", cfg.topics.model_dump(exclude={"embeddings_trust_pickle"}),
              lambda: run_topics(cfg, out, token_urls), deps=("vocab", "word2vec", "static"))
    if cfg.index.enabled:
        from embedjob.index import run_index

        # Only the word vectors of stages on in this run: files a disabled stage left behind (or that
        # someone else put there) are not this run's to index.
        word_kinds = [kind for kind, on in (("word2vec", cfg.word2vec.enabled), ("bert", cfg.static.enabled)) if on]
        stage("index", cfg.index.model_dump(), lambda: run_index(cfg, out, vector_urls, encoder, word_kinds),
              deps=("word2vec", "static"), reads="vectors")
    return stages
