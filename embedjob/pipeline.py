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

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from embedjob import preempt
from embedjob.cluster import init_ray, plan_encoder
from embedjob.commits import ShardCommits
from embedjob.config import JobConfig
from embedjob.corpus_stages import recipe_hash, run_corpus_stages
from embedjob.errors import Interrupted, JobError
from embedjob.layout import (
    CONFIG,
    LANCE_DOCS,
    MANIFEST,
    REUSE_TMP,
    TIMELINE,
    TMP,
    TOKENS_DIR,
    VECTORS,
    shard_file,
    stats_file,
)
from embedjob.lease import OutputLease
from embedjob.manifest import build_manifest, stage_stats
from embedjob.models import check_model, model_fingerprint
from embedjob.reconcile import (
    is_intact,
    list_lance_files,
    list_shard_files,
    outputs_to_keep,
    read_shard_markers,
    reconcile_outputs,
)
from embedjob.redact import redact, redact_url
from embedjob.report import write_run_report
from embedjob.report.timeline import Timeline
from embedjob.sample_corpus import sample_if_missing
from embedjob.stages.dedup.config import check_dedup
from embedjob.stages.encode import EncoderSettings, PoolPlan, resolve_encoder_settings
from embedjob.stages.encode.actor import encoder_pool
from embedjob.stages.lance_sink.dataset import run_lance
from embedjob.stages.lance_sink.write import check_sink
from embedjob.stages.preprocess import preprocess_batch
from embedjob.stages.read import InputError, ShardDatasource, ShardInfo, check_ids, discover_shards
from embedjob.stages.reuse.stage import ReusePlan, close_reuse, plan_reuse
from embedjob.stages.static.config import static_actor_settings
from embedjob.stages.write import staged_writes
from embedjob.storage import Storage

logger = logging.getLogger(__name__)


@dataclass
class JobResult:
    output_url: str
    manifest: dict[str, Any]
    failed_shards: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed_shards


def shard_stage_hash(cfg: JobConfig, encoder: EncoderSettings) -> str:
    """What per-shard outputs depend on: preprocessing, encoder settings and model, static options."""
    enc = {**encoder.recipe_dict(), "dtype": encoder.dtype}  # window settings too, when documents are cut
    static = cfg.static.model_dump() if cfg.static.enabled else None
    return recipe_hash({"preprocess": cfg.preprocess.model_dump(), "encoder": enc, "static": static,
                  "id": cfg.input.id_column, "text": cfg.input.text_column, "empty": cfg.input.on_empty_text,
                  **cfg.output.recipe_part()})


def run_job(cfg: JobConfig, *, dry_run: bool = False) -> Union[JobResult, str]:
    """Run every stage of ``cfg``; ``manifest.json`` is written whether the job succeeds or fails
    (with ``status`` and ``error``), and always describes exactly the files in the output.

    ``dry_run``: nothing is written; returns what ``embedjob run --dry-run`` prints (the resolved
    config, secrets masked, and what would be read and written). With ``input.create_sample_if_missing``
    an input that holds no shards gets the sample corpus first (a dry run only says so)."""
    t_start = time.time()
    inp = cfg.input
    if inp.create_sample_if_missing and sample_if_missing(inp.url, inp.storage_options, dry_run=dry_run) and dry_run:
        return _dry_run_text(cfg, None, {})
    # 1. checks before any Ray work
    shards = discover_shards(inp.url, inp.storage_options, inp.id_column, inp.text_column,
                             on_bad_shard=inp.on_bad_shard)
    id_stats = check_ids(shards, inp.storage_options, inp.id_column, on_bad_shard=inp.on_bad_shard,
                         on_duplicate_id=inp.on_duplicate_id)
    bad = [s for s in shards if s.error]
    if len(bad) == len(shards):
        raise InputError(f"no readable shard at {redact_url(inp.url)!r}: " + "; ".join(s.error or "" for s in bad))
    check_sink(cfg.output.url, cfg.output.lance, [s.url for s in shards if not s.error], inp.storage_options,
               cfg.output.carry_columns)
    check_model(cfg.encode.model, trust_remote_code=cfg.encode.trust_remote_code)  # fails here, not in the actors
    check_dedup(cfg.dedup, cfg.output.vector_dtype, None if cfg.output.removed_shards == "keep"
                else sum(s.num_rows for s in shards if not s.error))
    encoder = resolve_encoder_settings(cfg.encode)
    encoder.model_fingerprint = model_fingerprint(encoder.model_path)
    if cfg.output.vector_dtype == "int8":
        cfg.output.int8_max_for(encoder.normalize, encoder.dim)  # int8 of vectors of unknown range: exit 2 before any work
    out = Storage(cfg.output.url, cfg.output.storage_options)
    if dry_run:
        return _dry_run_text(cfg, shards, id_stats)
    with OutputLease(out, timeout_s=cfg.output.lease_timeout_s, force=cfg.output.force_unlock) as lease:
        return _run_leased(cfg, out, shards, id_stats, encoder, lease, t_start)


@dataclass
class _Run:
    """What one run knows as it goes, handed from phase to phase of :func:`_run_leased`."""

    cfg: JobConfig
    out: Storage
    shards: list[ShardInfo]
    id_stats: dict[str, Any]
    encoder: EncoderSettings
    lease: OutputLease
    t_start: float
    ray_info: dict[str, Any] = field(default_factory=dict)
    plan: Optional[PoolPlan] = None  # the encoder pool, once Ray is up
    stage_hash: str = ""
    status: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard -> status, rows, marker
    stages: dict[str, Any] = field(default_factory=dict)
    keep: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard -> the marker whose files stay
    superseded: dict[str, Any] = field(default_factory=dict)
    error: Optional[Exception] = None
    reuse: ReusePlan = field(default_factory=ReusePlan)  # output.reuse: rows copied instead of encoded
    timeline: Timeline = field(default_factory=Timeline)  # throughput and memory, stats/timeline.json


def _run_leased(cfg: JobConfig, out: Storage, shards: list[ShardInfo], id_stats: dict[str, Any],
                encoder: EncoderSettings, lease: OutputLease, t_start: float) -> JobResult:
    """The job's work, while this run holds the output's lease (one writer at a time, lease.py)."""
    run = _Run(cfg, out, shards, id_stats, encoder, lease, t_start)
    preempt.arm()  # SIGTERM from now on: stop taking blocks, commit what is done
    run.timeline.start()
    try:
        return _run_phases(run)
    finally:
        preempt.disarm()
        run.timeline.stop()


def _run_phases(run: _Run) -> JobResult:
    cfg, out, lease, t_start = run.cfg, run.out, run.lease, run.t_start
    _start_ray(run)
    previous = read_shard_markers(out)
    todo = _plan_shards(run, previous)
    run.reuse = plan_reuse(cfg.output, cfg.input, out, todo, previous, run.status, run.stage_hash, lease.run_id,
                           static_enabled=cfg.static.enabled)
    _pull_in(run, todo)
    _encode_shards(run, todo)
    # one recipe in the output: keep what this run vouches for, move the rest aside
    run.keep, reasons = outputs_to_keep(cfg.output.removed_shards, run.status, previous, run.stage_hash)
    lease.check()  # another run took the output over: move nothing, leave the manifest to it
    run.superseded = reconcile_outputs(out, keep=run.keep, markers=previous, reasons=reasons, run_id=lease.run_id)
    run.stages["reuse"] = close_reuse(out, run.reuse, run.status, run.stages["encode"], run.superseded)
    if run.error is None:
        for name, stats in (("read", "encode"), ("preprocess", "encode"), ("encode", "encode"), ("reuse", "reuse")):
            out.write_json(stats_file(name), stage_stats(name, run.status, run.stages[stats]))
        _corpus_stages(run)
    out.delete(REUSE_TMP, recursive=True)  # the lookup's removed ids, read by the Lance merge
    lease.check()  # another run took the output over: leave the manifest to it
    out.write_json(TIMELINE, run.timeline.stop())
    manifest = build_manifest(run)
    out.write_json(CONFIG, manifest["config"])  # the resolved config, secrets masked
    out.write_json(MANIFEST, manifest)  # written last, on success and on failure
    write_run_report(out)  # report.html; a report that cannot be drawn only logs a warning
    committed, failed = manifest["totals"]["committed_shards"], manifest["totals"]["failed"]
    if run.error is not None:
        logger.error("failed after %.1fs; manifest.json records what was committed (%d shards)",
                     time.time() - t_start, committed)
        raise run.error
    logger.info("done in %.1fs: %d shards committed (%d new), %d failed; output %s", time.time() - t_start,
                committed, manifest["totals"]["done"], failed, out.url())
    return JobResult(out.url(), manifest, sorted(k for k, v in run.status.items() if v["status"] == "failed"))


def _start_ray(run: _Run) -> None:
    """Start or join Ray, size the encoder pool, and fix the recipe (the shard stage hash)."""
    try:
        run.ray_info = init_ray(run.cfg.ray)
    except SystemExit as e:  # SIGTERM while ray.init ran, under Ray's own handler: interrupted, nothing done
        interrupted = preempt.during_ray_start(e)
        if interrupted is None:
            raise
        raise interrupted from None
    preempt.arm()  # put the handler back: ray.init replaced it with its own
    run.plan = plan_encoder(run.cfg.encode, run.ray_info["resources"], static=run.cfg.static.enabled)
    if run.plan.device == "cuda":
        cuda = resolve_encoder_settings(run.cfg.encode, "cuda")
        run.encoder.dtype, run.encoder.batching = cuda.dtype, cuda.batching  # batching: packed or padded, as run
    run.encoder.device = run.plan.device
    run.stage_hash = shard_stage_hash(run.cfg, run.encoder)


def _plan_shards(run: _Run, previous: dict[str, dict[str, Any]]) -> list[ShardInfo]:
    """The shards that need work; a committed shard is skipped when its input, recipe and files
    are intact. Bad shards are recorded as failed."""
    files = list_shard_files(run.out)
    lance_files = list_lance_files(run.out) if run.cfg.output.lance else None
    todo: list[ShardInfo] = []
    for s in run.shards:
        if s.error:
            run.status[s.key] = {"status": "failed", "url": s.url, "reason": s.error}
            continue
        marker = None if run.cfg.output.overwrite else previous.get(s.key)
        if (marker and marker.get("input") == s.fingerprint() and marker.get("stage_hash") == run.stage_hash
                and is_intact(marker, files, s.key, lance_files)):
            run.status[s.key] = {"status": "skipped-unchanged", "url": s.url, "rows": marker.get("rows_out"),
                                 "marker": marker}
        else:
            todo.append(s)
    logger.info("shards: %d to process, %d unchanged, %d bad", len(todo),
                sum(1 for v in run.status.values() if v["status"] == "skipped-unchanged"),
                sum(1 for s in run.shards if s.error))
    return todo


def _pull_in(run: _Run, todo: list[ShardInfo]) -> None:
    """Unchanged shards the reuse plan processes again (static word vectors: they hold rows of a
    static part that cannot be carried, stages/reuse/static.py) join ``todo``."""
    pulled = run.reuse.static.pulled if run.reuse.static is not None else []
    by_key = {s.key: s for s in run.shards}
    for key in pulled:
        run.status.pop(key, None)
        todo.append(by_key[key])
    if pulled:
        logger.info("reuse: %d unchanged shard(s) processed again for the static word vectors: %s", len(pulled),
                    ", ".join(pulled))


def _encode_shards(run: _Run, todo: list[ShardInfo]) -> None:
    """The per-shard stages over ``todo``; a failure is recorded in ``run.error`` with the shards
    committed before it."""
    t0 = time.time()
    run.timeline.stage("encode")
    try:
        processed, failures, shard_stats = run_shard_stages(run.cfg, run.out, todo, run.encoder, run.plan,
                                                            run.stage_hash, timeline=run.timeline, reuse=run.reuse)
    except (JobError, InputError) as e:  # what was committed before the failure is kept and recorded
        run.error, processed, failures = e, getattr(e, "committed", {}), {}
        shard_stats = {"error": str(e)}
    status = run.status
    for key, marker in processed.items():
        status[key] = {"status": "done", "url": marker["input"]["url"], "rows": marker["rows_out"], "marker": marker}
    for key, reason in failures.items():
        status[key] = {"status": "failed", "url": next(s.url for s in run.shards if s.key == key), "reason": reason}
    for s in todo:
        if s.key not in status:  # not reached: the job stopped first
            status[s.key] = {"status": "interrupted" if isinstance(run.error, Interrupted) else "failed", "url": s.url,
                             "reason": f"not processed: the job stopped ({run.error})"}
    shard_stats["seconds"] = round(time.time() - t0, 3)
    run.stages["encode"] = shard_stats


def _corpus_stages(run: _Run) -> None:
    """The corpus-wide stages over every kept shard; a failure is recorded in ``run.error``."""
    cfg, out, inp = run.cfg, run.out, run.cfg.input
    committed = sorted(run.keep)
    token_urls = [out.url(shard_file(TOKENS_DIR, k)) for k in committed]
    vector_urls = [out.url(shard_file(VECTORS, k)) for k in committed]
    fingerprints = {k: run.keep[k].get("input") for k in committed}
    inputs_hash = {  # what corpus-wide stages read: token files (preprocessing) or vector files (+ encoder)
        "tokens": recipe_hash({"shards": fingerprints, "preprocess": cfg.preprocess.model_dump(),
                         "columns": [inp.id_column, inp.text_column], "empty": inp.on_empty_text}),
        "vectors": recipe_hash({"shards": fingerprints, "stage": run.stage_hash}),
    }
    try:
        if cfg.output.lance or out.exists(LANCE_DOCS):  # a version of exactly the kept shards, or moved aside
            run.stages["lance"] = run_lance(cfg.output, out, run.keep, run.encoder.normalize, run.stages,
                                            run.lease.run_id, removed=_removed_ids(run))
        run_corpus_stages(cfg, out, token_urls, vector_urls, committed, run.encoder, inputs_hash, stages=run.stages,
                          timeline=run.timeline, input_urls={k: (fingerprints[k] or {}).get("url") for k in committed})
    except JobError as e:
        run.error = e


def _removed_ids(run: _Run) -> Optional[dict[str, Any]]:
    """The reuse lookup's removed ids for the Lance merge, when every shard of this run committed
    (else the merge finds them by reading the dataset's ids)."""
    if run.reuse.removed is None or any(v["status"] != "done" for v in run.status.values()
                                        if v["status"] != "skipped-unchanged"):
        return None
    return run.reuse.removed


def _dry_run_text(cfg: JobConfig, shards: Optional[list[ShardInfo]], id_stats: dict[str, Any]) -> str:
    """``--dry-run``: the resolved config (secrets masked) and what would be read and written
    (``shards`` None: the input holds none yet, a run builds the sample corpus there first)."""
    import yaml

    config = yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False).rstrip()
    if shards is None:
        return f"{config}\n# input {cfg.input.url} holds no shards yet: a run builds the sample corpus there first"
    lines = ["# resolved job config", config,
             f"# {len(shards)} shard(s), {sum(s.num_rows for s in shards)} rows"
             + (f", {id_stats['duplicate_rows']} duplicate id row(s)" if id_stats.get("duplicate_rows") else "")]
    for s in shards:
        lines.append(f"{redact_url(s.url)}\t{s.num_rows} rows\t-> {shard_file(VECTORS, s.key)}"
                     + (f"\tBAD: {s.error}" if s.error else ""))
    return "\n".join(lines)


BLOCK_BYTES = 4 * 1024 * 1024  # Ray Data target block size of the per-shard pipeline


# -- per-shard stages: one streaming Ray Data pipeline ------------------------------------------
def run_shard_stages(cfg: JobConfig, out: Storage, todo: list[ShardInfo], encoder: EncoderSettings,
                     plan: PoolPlan, stage_hash: str, *, timeline: Optional[Timeline] = None,
                     reuse: Optional[ReusePlan] = None):
    """read -> preprocess -> encode -> staged write, committing shards as they complete (``reuse``: rows copied).

    Returns (markers of committed shards, {shard: failure reason}, encode stats)."""
    commits = ShardCommits(cfg, out, todo, encoder, plan, stage_hash, reuse)
    if timeline is not None:
        timeline.watch(docs=lambda: commits.encoded()[0], tokens=lambda: commits.encoded()[1],  # per model batch
                       encoder_rss_mb=lambda: commits.stats.get("encoder_peak_rss_mb"))
    if not todo:
        return {}, {}, commits.stats
    for s in todo:  # leftovers of an interrupted run are never mixed with new parts
        out.delete(f"{TMP}/{s.key}", recursive=True)
    commits.start()  # the progress counter the encoder actors report to, and the progress line
    try:
        if commits.to_encode():  # every row reused: no stream, no encoder to start (the commits copy them)
            ds = _shard_dataset(cfg, out, todo, encoder, plan, commits.counter, reuse.reused if reuse else None)
            for rep in preempt.stream(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)):
                commits.add_report(rep)
    except Exception as e:  # noqa: BLE001 - surface the user's error, keep what was committed
        err = commits.failed(e)
        raise err from (None if isinstance(err, InputError) else e)
    if preempt.requested():  # SIGTERM: the shards whose rows are all written are committed, the rest wait
        raise commits.interrupted()
    return commits.finish()


def _shard_dataset(cfg: JobConfig, out: Storage, todo: list[ShardInfo], encoder: EncoderSettings,
                   plan: PoolPlan, counter: Any = None, skip_rows: Optional[dict[str, Any]] = None):
    """The Ray Data pipeline over ``todo``: read -> preprocess -> encode (actor pool) -> staged
    write; each output row reports one staged part (shard, row range, counts)."""
    import ray
    from ray.data import DataContext

    inp = cfg.input
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # embedjob's own line (or bar, on a terminal) counts documents: commits.py
    ctx.execution_options.preserve_order = False
    # Ray Data merges a task's outputs until they reach target_max_block_size (128 MiB by default),
    # which would turn a whole shard into one block: one actor call per shard, no progress until it
    # is done, a retry redoing it all and actor memory growing with the shard. A few MiB keeps
    # blocks at hundreds to a few thousand rows (input.rows_per_block is the most a read yields).
    ctx.target_max_block_size = min(ctx.target_max_block_size or BLOCK_BYTES, BLOCK_BYTES)
    # A UDF's own error (InputError naming shard, row and id) reaches the driver as itself, not as
    # "UDF failed to process a data block" with the cause only in Ray's logs.
    ctx.raise_original_map_exception = True
    ctx.max_consecutive_actor_init_deaths = cfg.encode.max_actor_init_deaths  # a lost actor is replaced
    static = None
    if cfg.static.enabled:
        static = static_actor_settings(cfg.static, cfg.encode.model, out)

    ds = ray.data.read_datasource(
        ShardDatasource.create(todo, inp.storage_options, inp.id_column, inp.text_column, inp.rows_per_block,
                               on_bad_shard=inp.on_bad_shard, out_url=out.url(), out_options=out.storage_options,
                               skip_rows=skip_rows),
        override_num_blocks=len(todo),
    )
    ds = ds.map_batches(
        preprocess_batch, fn_kwargs={
            "cfg": cfg.preprocess, "text_column": inp.text_column, "encoder_settings": encoder,
            "static_settings": static, "on_empty_text": inp.on_empty_text, "id_column": inp.id_column},
        batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
        compute=ray.data.TaskPoolStrategy(size=plan.preprocess_concurrency),
    )
    ds = encoder_pool(ds, cfg.encode, encoder, plan, static, counter,
                      unfit={"on_bad_shard": inp.on_bad_shard, "out_url": out.url(), "out_options": out.storage_options,
                             "id_column": inp.id_column})
    return staged_writes(ds, out, inp.id_column)
