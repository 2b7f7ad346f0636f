"""`embedjob report` and the report.html of every run: a real small job with every stage, its page
loaded in a real headless Chromium (console errors, network requests, plots in the rendered DOM,
a screenshot), the timeline the driver sampled, the CLI; and the report's own arithmetic."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import numpy as np
import pytest

from embedjob.cli import main as cli_main
from embedjob.pipeline import run_job
from embedjob.report import write_run_report
from embedjob.report.timeline import Timeline
from embedjob.report.topics import jsd_matrix, pcoa
from embedjob.storage import Storage
from tests.chromium import Chromium, find_chromium
from tests.conftest import SAMPLE_TEXTS, write_shards
from tests.helpers import small_job

SCREENSHOT_COPY = "/tmp/embedjob-report.png"
N_DOCS, N_TOPICS = 240, 3


@pytest.fixture(scope="module")
def job_output(ray_local, tmp_path_factory, tiny_model):
    """A finished small job with every stage (static, Word2Vec, topics, index) and a label column."""
    root = tmp_path_factory.mktemp("report-job")
    texts = [f"{SAMPLE_TEXTS[i % 12]} {SAMPLE_TEXTS[(i * 5 + 1) % 12]}" for i in range(N_DOCS)]
    write_shards(root / "in", texts, extra_columns={"label": [f"group-{i % 3}" for i in range(N_DOCS)]})
    cfg = small_job(root / "in", root / "out", tiny_model,
                    static={"enabled": True, "min_count": 1}, index={"enabled": True},
                    word2vec={"enabled": True, "min_count": 1, "workers": 1, "vector_size": 16, "epochs": 2},
                    topics={"enabled": True, "num_topics": N_TOPICS, "no_below": 1, "no_above": 0.9, "epochs": 3,
                            "batch_size": 64, "hidden_size": 16, "workers": 1, "coherence_docs": 200})
    run_job(cfg)
    return root / "out"


def test_run_writes_timeline_and_a_self_contained_report(job_output):
    tl = json.loads((job_output / "stats" / "timeline.json").read_text())
    assert len(tl["samples"]) >= 3
    assert [s[0] for s in tl["stages"]][:2] == ["encode", "vocab"] and "topics" in [s[0] for s in tl["stages"]]
    assert max(s.get("docs") or 0 for s in tl["samples"]) == N_DOCS
    assert all(s["driver_rss_mb"] > 0 for s in tl["samples"])
    page = (job_output / "report.html").read_text()
    assert len(page) < 1_000_000
    for outside in ("<script src", "<link", 'href="http', 'src="http', "url(http", "@import", "<img"):
        assert outside not in page, outside  # nothing fetched: the page works offline


def test_report_in_chromium(job_output, tmp_path):
    exe = find_chromium()
    if exe is None:  # .ci/run installs it: a machine without it fails here instead of passing silently
        pytest.fail("no Chromium found (apt-get install chromium, or set EMBEDJOB_CHROMIUM)")
    (tmp_path / "profile").mkdir()
    with Chromium(exe, str(tmp_path / "profile")) as browser:
        browser.load((job_output / "report.html").as_uri())
        dom = browser.evaluate("""JSON.stringify({
          sections: [...document.querySelectorAll('section')].map(s => s.id),
          plots: Object.fromEntries([...document.querySelectorAll('section')].map(s => [s.id,
            [...s.querySelectorAll('svg')].filter(g => g.getBoundingClientRect().width > 100
              && g.getBoundingClientRect().height > 100).length])),
          docPoints: document.querySelectorAll('#doc-points use').length,
          docTitles: document.querySelectorAll('#doc-points title').length,
          topicPoints: document.querySelectorAll('#topic-points title').length,
          cards: document.querySelectorAll('#topics .card').length,
          bars: document.querySelectorAll('#topics .card .bar').length,
          neighbourRows: document.querySelectorAll('#words tbody tr').length,
          indexRows: [...document.querySelectorAll('#index tbody tr')].map(r => r.innerText),
          status: document.querySelector('h1 .badge').innerText})""")
        shot = tmp_path / "report.png"
        width, height = browser.screenshot(str(shot))
        errors, requests = browser.errors(), browser.requests()
    shutil.copyfile(shot, SCREENSHOT_COPY)
    dom = json.loads(dom)
    assert errors == []
    assert [u for u in requests if not u.startswith("file:")] == []
    assert dom["sections"] == ["run", "timeline", "topics", "docmap", "words", "index", "dedup"]
    assert dom["plots"] == {"run": 1, "timeline": 1, "topics": 1, "docmap": 1, "words": 0, "index": 0, "dedup": 0}
    assert dom["docPoints"] == dom["docTitles"] == N_DOCS  # every document sampled, each with its id
    assert dom["topicPoints"] == dom["cards"] == N_TOPICS and dom["bars"] >= N_TOPICS * 5
    assert dom["neighbourRows"] >= 5
    assert len(dom["indexRows"]) == 3 and all("exact search" in r for r in dom["indexRows"])
    assert dom["status"] == "ok"
    assert shot.stat().st_size > 50_000 and height > 2000


def test_report_cli_label_column_and_no_output(job_output, tmp_path, capsys):
    dest = tmp_path / "labelled.html"
    assert cli_main(["report", str(job_output), "-o", str(dest), "--label-column", "label"]) == 0
    page = dest.read_text()
    assert "coloured by input column &#x27;label&#x27;" in page
    assert page.count("(group-") == N_DOCS  # each point's tooltip names its label
    assert cli_main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert cli_main(["report", str(job_output), "-o", str(dest), "--label-column", "colour"]) == 2
    assert "--label-column 'colour': no such column in input shard" in capsys.readouterr().err


def test_a_report_that_cannot_be_drawn_only_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="embedjob.report"):
        assert write_run_report(Storage(str(tmp_path))) is None
    assert "report: not written" in caplog.text
    assert not os.path.exists(tmp_path / "report.html")


def test_timeline_halves_its_samples_past_the_cap():
    tl = Timeline(every=3600, max_samples=10)
    docs = iter(range(1000))
    tl.watch(docs=lambda: next(docs))
    tl.stage("encode")
    for _ in range(25):
        tl.sample()
    out = tl.stop()
    assert len(out["samples"]) <= 11 and out["every_s"] > 3600
    assert out["stages"][0][0] == "encode" and out["stages"][0][2] is not None
    assert [s["docs"] for s in out["samples"]] == sorted(s["docs"] for s in out["samples"])


def test_intertopic_map_keeps_the_far_topic_far():
    p = np.array([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.05, 0.05, 0.1, 0.8]])
    d = np.sqrt(jsd_matrix(p))
    assert np.allclose(d, d.T) and np.allclose(np.diag(d), 0, atol=1e-6)
    xy = pcoa(d)
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    assert dist[0, 1] < dist[0, 2] and dist[0, 1] < dist[1, 2]
    assert np.allclose(dist, d, atol=0.05)  # three points: MDS keeps the distances


def test_run_section_names_failed_shards_and_their_reasons():
    from embedjob.report.build import run_section

    manifest = {"status": "partial", "totals": {"shards": 2, "done": 1, "failed": 1, "rows_out": 5},
                "shards": {"part-00000": {"status": "done", "rows_in": 5, "rows_out": 5},
                           "part-00001": {"status": "failed", "url": "s3://b/in/part-00001.parquet",
                                          "reason": "corrupt page in column 'text'", "previous_commit": "kept"}},
                "stages": {"encode": {"documents": 5, "bert_tokens": 60, "docs_per_second": 2.5,
                                      "tokens_per_second": 30.0, "seconds": 2.0}}}
    html = run_section(manifest)
    assert "part-00001" in html and "corrupt page in column &#x27;text&#x27;" in html and "kept" in html
    assert "2.5 docs/s, 30 tokens/s" in html and ">60<" in html


def test_timeline_thread_samples_and_stops_once():
    tl = Timeline(every=0.05).start()
    tl.stage("encode")
    time.sleep(0.4)
    first = tl.stop()
    assert len(first["samples"]) >= 4 and first["samples"][-1]["node_used_mb"] > 0
    assert tl.stop() == first  # the run's finally stops it again: nothing changes
