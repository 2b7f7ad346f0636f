"""Reads a job's output and assembles the report's sections (see ``embedjob/report/__init__.py``)."""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

import embedjob.report.page as P
import embedjob.report.plots as plots
from embedjob.errors import ReportError
from embedjob.layout import MANIFEST, TIMELINE, VECTORS, shard_file
from embedjob.redact import redact_url
from embedjob.report.dedup import attach_clusters, dedup_section
from embedjob.report.sample import DocSample, attach_labels, pca_2d, sample_documents
from embedjob.report.topics import topic_view
from embedjob.report.words import index_view, neighbours
from embedjob.stages.index.search import input_options
from embedjob.storage import Storage

logger = logging.getLogger(__name__)

SAMPLE_DOCS = 1500  # documents drawn on the map (and whose theta gives the topic sizes)
STAGE_ORDER = ("encode", "vocab", "static", "word2vec", "topics", "index", "dedup")


def _stage_rate(name: str, s: dict[str, Any]) -> str:
    """A stage's throughput in words, from what its stats record."""
    sec = s.get("seconds") or 0.0
    if name == "encode" and s.get("docs_per_second") is not None:
        busy = f"; encoder busy {100 * s['encoder_busy']:.0f}%" if s.get("encoder_busy") is not None else ""
        return f"{s['docs_per_second']:,.1f} docs/s, {s.get('tokens_per_second', 0):,.0f} tokens/s{busy}"
    if name == "vocab" and sec and s.get("tokens"):
        return f"{s['tokens'] / sec:,.0f} tokens/s"
    if name == "static" and sec and s.get("occurrences"):
        return f"{s['occurrences'] / sec:,.0f} word occurrences/s"
    if name == "word2vec" and s.get("words_per_s"):
        return f"{s['words_per_s']:,.0f} words/s (training)"
    if name == "topics" and s.get("train_seconds") and s.get("documents"):
        return f"{s['documents'] * (s.get('epochs') or 1) / s['train_seconds']:,.0f} docs/s (training)"
    if name == "index" and isinstance(s.get("docs"), dict) and s["docs"].get("build_seconds"):
        return f"{s['docs']['count'] / s['docs']['build_seconds']:,.0f} vectors/s (docs index build)"
    if name == "dedup" and sec and s.get("documents"):
        return f"{s['documents'] / sec:,.0f} documents/s"
    return ""


def _truncated(sample: Optional[DocSample], max_length: Any) -> Optional[str]:
    """Sampled documents cut at the model's max_length (their tokens past it were not encoded)."""
    if sample is None or not sample.n_tokens or not max_length:
        return None
    cut = sum(1 for n in sample.n_tokens if n >= int(max_length))
    return f"{cut:,} of {len(sample.n_tokens):,} sampled ({100 * cut / len(sample.n_tokens):.1f}%)"


def _token_rows(e: dict[str, Any], enc: dict[str, Any], sample: Optional[DocSample]) -> list[tuple[str, Any]]:
    """Tokens of the documents and what reached the model: windows, or truncation."""
    if enc.get("long_documents") == "windows":
        return [("BERT tokens (whole documents)", e.get("bert_tokens")),
                (f"tokens encoded / windows (overlap {enc.get('window_overlap')}"
                 f"{', snapped to sentences' if enc.get('snap_to_sentences') else ''})",
                 f"{e.get('encoded_tokens', 0):,} / {e.get('windows', 0):,}" if "windows" in e else None),
                (f"documents capped at max_windows {enc.get('max_windows')}", e.get("capped_documents"))]
    return [("BERT tokens encoded", e.get("bert_tokens")),
            (f"documents truncated at max_length {enc.get('max_length')}", _truncated(sample, enc.get("max_length")))]


def _pipeline(enc: dict[str, Any]) -> str:
    """The model's module pipeline in one line: architecture, heads, prompt, dimensions, batches."""
    parts = [enc.get("architecture") or "?", f"pool {enc.get('pooling')}"]
    parts += [h.get("type", "?") + (f" {h['out_features']}" if "out_features" in h else "") for h in enc.get("heads") or []]
    if enc.get("prompt"):
        name = enc.get("prompt_name")
        parts.append(f"prompt {name + ': ' if name else ''}{enc['prompt']!r}"
                     + ("" if enc.get("include_prompt", True) else " (not pooled)"))
    if enc.get("dimensions"):
        parts.append(f"first {enc['dimensions']} dims")
    if enc.get("batching"):
        parts.append(f"{enc['batching']} batches")
    return " · ".join(parts)


def _fault_rows(e: dict[str, Any]) -> list[tuple[str, Any]]:
    """What the encode stage survived (faults.py): nodes lost, blocks retried, out-of-memory splits."""
    lost = e.get("lost_nodes") or []
    rows: list[tuple[str, Any]] = []
    if lost or e.get("retried_blocks"):
        rows.append(("Ray nodes lost / blocks retried",
                     f"{len(lost)} ({', '.join(n.get('address') or n.get('node_id', '') for n in lost)}) / "
                     f"{e.get('retried_blocks')}" if lost else f"0 / {e.get('retried_blocks')}"))
    oom = e.get("oom")
    if oom:
        rows.append(("out of memory: batches split / token budget",
                     f"{oom.get('ooms')} / {oom.get('configured_batch_tokens')} -> {oom.get('batch_tokens')}"))
    return rows


def run_section(m: dict[str, Any], sample: Optional[DocSample] = None) -> str:
    """Inputs, recipe, counts, tokens, per-stage time and throughput, failed shards."""
    inp, enc, tot, stages = m.get("input") or {}, m.get("encoder") or {}, m.get("totals") or {}, m.get("stages") or {}
    shards = m.get("shards") or {}
    e = stages.get("encode") or {}
    rows_in = sum(int(v.get("rows_in") or 0) for v in shards.values())
    static = stages.get("static") or {}
    left = [("input", inp.get("url")), ("shards", tot.get("shards")), ("ids checked", (inp.get("ids") or {}).get("rows")),
            ("duplicate id rows", (inp.get("ids") or {}).get("duplicate_rows")),
            ("recipe", m.get("recipe")), ("model", enc.get("model")),
            ("pooling / normalise", f"{enc.get('pooling')} / {enc.get('normalize')}"),
            ("model pipeline", _pipeline(enc)),
            ("dimension", enc.get("dim")), ("dtype / device", f"{enc.get('dtype')} / {enc.get('device')}"),
            ("encoder actors", (enc.get("actors") or {}).get("actors"))]
    right = [("shards encoded / unchanged / failed",
              f"{tot.get('done', 0)} / {tot.get('skipped_unchanged', 0)} / {tot.get('failed', 0)}"),
             ("rows read (this run)", rows_in), ("rows in the output", tot.get("rows_out")),
             ("documents encoded / reused / removed (output.reuse)",
              " / ".join(str((tot.get("documents") or {}).get(k, "-")) for k in ("encoded", "reused", "removed"))),
             ("of those encoded: again, for the static word vectors (an edited or removed document's shard part "
              "cannot be carried)", ((stages.get("reuse") or {}).get("static") or {}).get("documents_encoded_again")),
             ("empty texts (kept / skipped)", f"{sum(int(v.get('empty_text') or 0) for v in shards.values())} / "
                                              f"{sum(int(v.get('skipped_empty') or 0) for v in shards.values())}"),
             *_token_rows(e, enc, sample),
             ("gensim tokens", (stages.get("vocab") or {}).get("tokens")),
             ("vocabulary", (stages.get("vocab") or {}).get("words")),
             ("word occurrences dropped by static.min_count",
              (static["occurrences"] - static["occurrences_kept"]) if "occurrences_kept" in static else None),
             *_fault_rows(e),
             ("wall time", f"{m.get('wall_seconds', 0):,.1f} s")]
    body = f'<div class="flex"><div>{P.kv(left)}</div><div>{P.kv(right)}</div></div>'
    names = [n for n in STAGE_ORDER if n in stages] + [n for n in stages if n not in STAGE_ORDER]
    rows = [[n, stages[n].get("status", "done" if "error" not in stages[n] else "failed"), stages[n].get("seconds"),
             _stage_rate(n, stages[n])] for n in names]
    body += "<h3>Stages</h3>" + P.table(["stage", "status", "seconds", "throughput"], rows, numeric={2})
    timed = [(n, float(stages[n]["seconds"])) for n in names if isinstance(stages[n].get("seconds"), (int, float))]
    if timed:
        body += P.plot(plots.stage_bars(timed))
    failed = [[k, v.get("url"), v.get("reason"), v.get("previous_commit", "")] for k, v in shards.items()
              if v.get("status") == "failed"]
    body += "<h3>Failed shards</h3>" + (P.table(["shard", "file", "reason", "earlier commit"], failed) if failed
                                        else P.absent("none"))
    if m.get("error"):
        body += f'<p class="err">error: {P.esc(m["error"])}</p>'
    return P.section("run", "The run", body)


def timeline_section(out: Storage) -> str:
    if not out.exists(TIMELINE):
        return P.section("timeline", "Throughput and memory over time", P.absent("no stats/timeline.json in this output"))
    tl = out.read_json(TIMELINE)
    samples = tl.get("samples") or []
    if len(samples) < 2:
        return P.section("timeline", "Throughput and memory over time", P.absent("too short a run to sample"))
    svg = plots.timeline(samples, tl.get("stages") or [])
    return P.section("timeline", "Throughput and memory over time", P.plot(
        svg, f"{len(samples)} samples every {tl.get('every_s', 0):g} s by the driver; encode throughput over a "
             "rolling window; memory of the driver process, the encoder actors' peak (as blocks report it) and "
             "the driver's whole node (dashed, right scale)"))


def topics_section(view: Optional[dict[str, Any]]) -> str:
    if view is None:
        return P.section("topics", "Topics", P.absent("no topic model in this output (topics.enabled: false)"))
    mt = view.get("metrics") or {}
    coh = mt.get("coherence") or {}
    summary = P.kv([("model", view.get("model")), ("topics", view.get("num_topics")),
                    ("vocabulary", view.get("vocabulary")),
                    ("NPMI (mean)", (coh.get("c_npmi") or {}).get("mean")),
                    ("C_V (mean)", (coh.get("c_v") or {}).get("mean")), ("diversity", mt.get("diversity"))])
    body = summary
    if view.get("xy"):
        labels = [f"topic {i}: " + ", ".join(t.get("words", [])[:6]) for i, t in enumerate(view["topics"])]
        svg = plots.topic_map(np.asarray(view["xy"]), np.asarray(view["prevalence"]), labels)
        body += "<h3>Intertopic distance map</h3>" + P.plot(
            svg, "Jensen-Shannon distances between topic-word distributions, classical MDS; area ~ prevalence")
    body += ("<h3>Topics</h3>" + P.absent(f"bars: grey = the word's corpus count, red = its estimated count "
                                           f"in the topic; words ranked by relevance (lambda={view.get('lambda', 0.5)})")
             + P.topic_cards(view))
    return P.section("topics", "Topics", body)


def docmap_section(sample: DocSample, view: Optional[dict[str, Any]], label_column: Optional[str],
                   clusters: bool = False) -> str:
    title = "Document map"
    if sample.vectors is None or len(sample.vectors) < 3:
        return P.section("docmap", title, P.absent("too few document vectors to draw a map"))
    xy, share = pca_2d(sample.vectors)
    if sample.labels is not None:
        names = sorted(set(sample.labels))
        classes = np.array([names.index(x) for x in sample.labels])
        what = "coloured by k-means cluster (dedup.clusters)" if clusters else f"coloured by input column {label_column!r}"
        titles = [f"{i} ({lab})" for i, lab in zip(sample.ids, sample.labels)]
    elif sample.theta is not None and view is not None:
        ok = ~np.isnan(sample.theta).any(axis=1)
        classes = np.where(ok, np.nan_to_num(sample.theta).argmax(axis=1), -1)
        names = [f"topic {i}: " + ", ".join(t.get("words", [])[:3]) for i, t in enumerate(view["topics"])]
        what = "coloured by dominant topic"
        titles = [f"{i} (topic {c})" for i, c in zip(sample.ids, classes)]
    else:
        classes, names, what, titles = np.zeros(len(xy), int), ["documents"], "one colour (no topics)", list(sample.ids)
    svg = plots.doc_map(xy, classes, names, titles, share)
    return P.section("docmap", title, P.plot(
        svg, f"PCA of {len(xy):,} sampled document vectors (of {sample.total:,} in {sample.shards_drawn} shard(s)), "
             f"{what}; hover a point for its id"))


def words_section(view: Optional[dict[str, Any]]) -> str:
    if view is None:
        return P.section("words", "Word neighbours", P.absent("no word vectors in this output"))
    return P.section("words", "Word neighbours", P.neighbours_table(view))


def index_section(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return P.section("index", "Indices", P.absent("no FAISS index in this output (index.enabled: false)"))
    body = P.table(["index", "kind", "factory", "metric", "vectors", "dim", "size (MiB)", "build s", "recall@10", ""],
                   [[r["name"], r["kind"], r["factory"], r["metric"], r["count"], r["dim"],
                     None if r["bytes"] is None else r["bytes"] / 2**20, r["build_seconds"], r["recall_at_10"],
                     r["recall_note"]] for r in rows], numeric={4, 5, 6, 7, 8})
    return P.section("index", "Indices", body)


def build_report(out: Storage, *, label_column: Optional[str] = None,
                 input_storage_options: Optional[dict[str, Any]] = None, sample_docs: int = SAMPLE_DOCS) -> str:
    """The report of the output at ``out`` as one HTML document."""
    if not out.exists(MANIFEST):
        raise ReportError(f"no {MANIFEST} at {out.url()}: not a job output, or its first run has not finished")
    m = out.read_json(MANIFEST)
    keys = sorted(k for k, v in (m.get("shards") or {}).items() if v.get("status") != "failed")
    keys = [k for k in keys if out.exists(shard_file(VECTORS, k))]
    sample = sample_documents(out, keys, sample_docs, shard_rows=m.get("shards"))
    if label_column:
        attach_labels(sample, m, label_column, input_options(m.get("input") or {}, out, input_storage_options))
    clusters = not label_column and attach_clusters(out, sample)  # dedup.clusters colour the map
    lam = float(((m.get("config") or {}).get("topics") or {}).get("ranking_lambda", 0.5))
    tview = topic_view(out, sample.theta, lam)
    status = m.get("status", "?")
    header = (f"<h1>{P.esc(m.get('job'))} <span class=\"badge {P.esc(status)}\">{P.esc(status)}</span></h1>"
              f"<div class=\"sub\">run {P.esc(m.get('run_id'))} · written {P.esc(m.get('created_at'))} · "
              f"output {P.esc(redact_url(out.url()))} · embedjob {P.esc(m.get('embedjob_version'))}</div>")
    sections = [run_section(m, sample), timeline_section(out), topics_section(tview), docmap_section(sample, tview, label_column, clusters),
                words_section(neighbours(out)), index_section(index_view(out, keys, sample.vectors)),
                dedup_section(out, (m.get("stages") or {}).get("dedup"))]
    data = {"status": status, "rows_out": (m.get("totals") or {}).get("rows_out"), "sampled_docs": len(sample.ids),
            "sections": [s[len('<section id="'):].split('"', 1)[0] for s in sections]}
    return P.page(f"embedjob report: {m.get('job')}", header, sections, data)
