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
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from embedjob import preempt
from embedjob.cluster import init_ray, plan_encoder
from embedjob.commits import ShardCommits
from embedjob.config import JobConfig
from embedjob.errors import Interrupted, JobError, NothingToDo, root_cause
from embedjob.layout import (
    CONFIG,
    LANCE_DOCS,
    MANIFEST,
    TIMELINE,
    TMP,
    TOKENS_DIR,
    VECTORS,
    stage_marker,
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
    read_marker,
    read_shard_markers,
    reconcile_outputs,
)
from embedjob.redact import redact, redact_url
from embedjob.report import write_run_report
from embedjob.report.timeline import Timeline
from embedjob.sample_corpus import sample_if_missing
from embedjob.stages.dedup.config import check_dedup, dedup_settings
from embedjob.stages.dedup.stage import run_dedup, text_source
from embedjob.stages.encode import EncoderSettings, resolve_encoder_settings
from embedjob.stages.encode.actor import encoder_pool
from embedjob.stages.index.stage import run_index
from embedjob.stages.lance_sink.dataset import run_lance
from embedjob.stages.lance_sink.write import check_sink
from embedjob.stages.preprocess import preprocess_batch
from embedjob.stages.read import InputError, ShardDatasource, ShardInfo, check_ids, discover_shards
from embedjob.stages.static.config import static_actor_settings
from embedjob.stages.static.stage import run_static
from embedjob.stages.vocab import run_vocab
from embedjob.stages.word2vec.stage import run_word2vec
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


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_stage_hash(cfg: JobConfig, encoder: EncoderSettings) -> str:
    """What per-shard outputs depend on: preprocessing, encoder settings and model, static options."""
    enc = {**encoder.recipe_dict(), "dtype": encoder.dtype}  # window settings too, when documents are cut
    static = cfg.static.model_dump() if cfg.static.enabled else None
    return _hash({"preprocess": cfg.preprocess.model_dump(), "encoder": enc, "static": static,
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
    plan: dict[str, Any] = field(default_factory=dict)
    stage_hash: str = ""
    status: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard -> status, rows, marker
    stages: dict[str, Any] = field(default_factory=dict)
    keep: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard -> the marker whose files stay
    superseded: dict[str, Any] = field(default_factory=dict)
    error: Optional[Exception] = None
    timeline: Timeline = field(default_factory=Timeline)  # throughput and memory, stats/timeline.json


def _run_leased(cfg: JobConfig, out: Storage, shards: list[ShardInfo], id_stats: dict[str, Any],
                encoder: EncoderSettings, lease: OutputLease, t_start: float) -> JobResult:
    """The job's work, while this run holds the output's lease (one writer at a time, lease.py)."""
    run = _Run(cfg, out, shards, id_stats, encoder, lease, t_start)
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
    _encode_shards(run, todo)
    # one recipe in the output: keep what this run vouches for, move the rest aside
    run.keep, reasons = outputs_to_keep(cfg.output.removed_shards, run.status, previous, run.stage_hash)
    lease.check()  # another run took the output over: move nothing, leave the manifest to it
    run.superseded = reconcile_outputs(out, keep=run.keep, markers=previous, reasons=reasons, run_id=lease.run_id)
    if run.error is None:
        for name in ("read", "preprocess", "encode"):
            out.write_json(stats_file(name), stage_stats(name, run.status, run.stages["encode"]))
        _corpus_stages(run)
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
    run.ray_info = init_ray(run.cfg.ray)
    preempt.arm()  # SIGTERM from now on: stop taking blocks, commit what is done (after ray.init's own handler)
    run.plan = plan_encoder(run.cfg.encode, run.ray_info["resources"], static=run.cfg.static.enabled)
    if run.plan["device"] == "cuda":
        cuda = resolve_encoder_settings(run.cfg.encode, "cuda")
        run.encoder.dtype, run.encoder.batching = cuda.dtype, cuda.batching  # batching: packed or padded, as run
    run.encoder.device = run.plan["device"]
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


def _encode_shards(run: _Run, todo: list[ShardInfo]) -> None:
    """The per-shard stages over ``todo``; a failure is recorded in ``run.error`` with the shards
    committed before it."""
    t0 = time.time()
    run.timeline.stage("encode")
    try:
        processed, failures, shard_stats = run_shard_stages(run.cfg, run.out, todo, run.encoder, run.plan,
                                                            run.stage_hash, timeline=run.timeline)
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
    token_urls = [out.url(f"{TOKENS_DIR}/{k}.parquet") for k in committed]
    vector_urls = [out.url(f"{VECTORS}/{k}.parquet") for k in committed]
    fingerprints = {k: run.keep[k].get("input") for k in committed}
    inputs_hash = {  # what corpus-wide stages read: token files (preprocessing) or vector files (+ encoder)
        "tokens": _hash({"shards": fingerprints, "preprocess": cfg.preprocess.model_dump(),
                         "columns": [inp.id_column, inp.text_column], "empty": inp.on_empty_text}),
        "vectors": _hash({"shards": fingerprints, "stage": run.stage_hash}),
    }
    try:
        if cfg.output.lance or out.exists(LANCE_DOCS):  # a version of exactly the kept shards, or moved aside
            run.stages["lance"] = run_lance(cfg.output, out, run.keep, run.encoder.normalize, run.stages,
                                            run.lease.run_id)
        run_corpus_stages(cfg, out, token_urls, vector_urls, committed, run.encoder, inputs_hash, stages=run.stages,
                          timeline=run.timeline, input_urls={k: (fingerprints[k] or {}).get("url") for k in committed})
    except JobError as e:
        run.error = e


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
        lines.append(f"{redact_url(s.url)}\t{s.num_rows} rows\t-> {VECTORS}/{s.key}.parquet"
                     + (f"\tBAD: {s.error}" if s.error else ""))
    return "\n".join(lines)


BLOCK_BYTES = 4 * 1024 * 1024  # Ray Data target block size of the per-shard pipeline


# -- per-shard stages: one streaming Ray Data pipeline ------------------------------------------
def run_shard_stages(cfg: JobConfig, out: Storage, todo: list[ShardInfo], encoder: EncoderSettings,
                     plan: dict[str, Any], stage_hash: str, *, timeline: Optional[Timeline] = None):
    """read -> preprocess -> encode -> staged write, committing shards as they complete.

    Returns (markers of committed shards, {shard: failure reason}, encode stats)."""
    commits = ShardCommits(cfg, out, todo, encoder, plan, stage_hash)
    if timeline is not None:
        timeline.watch(docs=lambda: commits.encoded()[0], tokens=lambda: commits.encoded()[1],  # per model batch
                       encoder_rss_mb=lambda: commits.stats.get("encoder_peak_rss_mb"))
    if not todo:
        return {}, {}, commits.stats
    for s in todo:  # leftovers of an interrupted run are never mixed with new parts
        out.delete(f"{TMP}/{s.key}", recursive=True)
    commits.start()  # the progress counter the encoder actors report to, and the progress line
    try:
        ds = _shard_dataset(cfg, out, todo, encoder, plan, commits.counter)
        for rep in preempt.stream(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)):
            commits.add_report(rep)
    except Exception as e:  # noqa: BLE001 - surface the user's error, keep what was committed
        err = commits.failed(e)
        raise err from (None if isinstance(err, InputError) else e)
    if preempt.requested():  # SIGTERM: the shards whose rows are all written are committed, the rest wait
        raise commits.interrupted()
    return commits.finish()


def _shard_dataset(cfg: JobConfig, out: Storage, todo: list[ShardInfo], encoder: EncoderSettings,
                   plan: dict[str, Any], counter: Any = None):
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
                               on_bad_shard=inp.on_bad_shard, out_url=out.url(), out_options=out.storage_options),
        override_num_blocks=len(todo),
    )
    ds = ds.map_batches(
        preprocess_batch, fn_kwargs={
            "cfg": cfg.preprocess, "text_column": inp.text_column, "encoder_settings": encoder,
            "static_settings": static, "on_empty_text": inp.on_empty_text, "id_column": inp.id_column},
        batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
        compute=ray.data.TaskPoolStrategy(size=plan.get("preprocess_concurrency")),
    )
    ds = encoder_pool(ds, cfg.encode, encoder, plan, static, counter,
                      unfit={"on_bad_shard": inp.on_bad_shard, "out_url": out.url(), "out_options": out.storage_options,
                             "id_column": inp.id_column})
    return staged_writes(ds, out, inp.id_column)


# -- corpus-wide stages ------------------------------------------------------------------------
class CorpusStages:
    """Runs corpus-wide stages, each skipped when its inputs (token or vector files), its settings
    and the stages it reads are unchanged since its last success (``_done/stage-<name>.json``).

    Each stage's stats are added to ``stages`` as it ends, so a later stage's failure leaves the
    earlier ones on record."""

    def __init__(self, cfg: JobConfig, out: Storage, inputs_hash: dict[str, str], stages: dict[str, Any],
                 timeline: Optional[Timeline] = None):
        self.cfg, self.out, self.inputs_hash, self.stages = cfg, out, inputs_hash, stages
        self.timeline = timeline or Timeline()  # not started: stages are only recorded

    def run(self, name: str, settings: Any, fn: Callable[[], dict[str, Any]], deps: tuple[str, ...] = (),
            reads: str = "tokens") -> None:
        key = _hash({"inputs": self.inputs_hash[reads], "settings": settings,
                     "deps": {d: self.stages[d].get("hash") for d in deps if d in self.stages}})
        preempt.check(name)  # SIGTERM: no stage starts
        prev = None if self.cfg.output.overwrite else read_marker(self.out, stage_marker(name))
        if prev and prev.get("hash") == key:
            logger.info("%s: unchanged since its last run, kept", name)
            self.stages[name] = {**prev.get("stats", {}), "status": "skipped-unchanged", "hash": key}
            return
        t = time.time()
        logger.info("%s: started", name)
        self.timeline.stage(name)
        try:
            result = fn()
        except NothingToDo as e:  # an empty corpus: the stage is skipped, not failed
            logger.info("%s: skipped: %s", name, e)
            self.stages[name] = {"status": "skipped", "reason": str(e), "seconds": round(time.time() - t, 3)}
            return
        except Exception as e:  # noqa: BLE001 - name the stage; earlier results stay as they were
            raise JobError(f"{name} stage failed: {root_cause(e)} (the outputs of its last successful run, "
                           "if any, are untouched)") from e
        result = {**result, "seconds": round(time.time() - t, 3)}
        self.out.write_json(stats_file(name), result)
        self.out.write_json(stage_marker(name), {"hash": key, "stats": result})
        self.stages[name] = {**result, "status": "done", "hash": key}
        logger.info("%s: done in %.1fs", name, time.time() - t)


def run_corpus_stages(cfg: JobConfig, out: Storage, token_urls: list[str], vector_urls: list[str],
                      committed: list[str], encoder: EncoderSettings, inputs_hash: dict[str, str],
                      stages: Optional[dict[str, Any]] = None, timeline: Optional[Timeline] = None,
                      input_urls: Optional[dict[str, Optional[str]]] = None) -> dict[str, Any]:
    """Vocabulary, static vectors, Word2Vec, topics, indices and dedup over the committed shards,
    in that order (each reads what the ones before it wrote); ``input_urls`` (shard -> input file)
    for the topics' ``label_column`` and the dedup report's texts."""
    stages = {} if stages is None else stages
    if not committed:
        logger.warning("no committed shard: corpus-wide stages skipped")
        return stages
    stage = CorpusStages(cfg, out, inputs_hash, stages, timeline).run
    stage("vocab", cfg.preprocess.model_dump(), lambda: run_vocab(out, token_urls))
    if cfg.static.enabled:
        stage("static", cfg.static.model_dump(), lambda: run_static(cfg.static, out, committed), deps=("vocab",),
              reads="vectors")
    if cfg.word2vec.enabled:
        # Settings that cannot change the vectors (restarts, Ray's folder, trusting a pickle) do not rerun the stage.
        stage("word2vec", cfg.word2vec.model_dump(exclude={"max_failures", "ray_storage_path", "init_trust_pickle"}),
              lambda: run_word2vec(cfg.word2vec, out, token_urls), deps=("vocab",))
    if cfg.topics.enabled:
        from embedjob.stages.topics.stage import run_topics

        stage("topics", cfg.topics.model_dump(exclude={"embeddings_trust_pickle"}),
              lambda: run_topics(cfg.topics, out, token_urls, input_urls=input_urls, id_column=cfg.input.id_column,
                                 input_storage_options=cfg.input.storage_options),
              deps=("vocab", "word2vec", "static"))
    if cfg.index.enabled:
        # Only the word vectors of stages on in this run: files a disabled stage left behind (or that
        # someone else put there) are not this run's to index.
        word_kinds = [kind for kind, on in (("word2vec", cfg.word2vec.enabled), ("bert", cfg.static.enabled)) if on]
        stage("index", cfg.index.model_dump(), lambda: run_index(cfg.index, out, vector_urls, encoder.normalize, word_kinds,
                                                                 chunks=cfg.encode.write_chunks),
              deps=("word2vec", "static"), reads="vectors")
    if cfg.dedup.enabled:
        stage("dedup", dedup_settings(cfg.dedup), lambda: run_dedup(cfg.dedup, out, vector_urls,
              texts=text_source(cfg.input, input_urls)), reads="vectors")
    return stages
