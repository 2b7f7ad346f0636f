"""``embedjob report OUTPUT``: one self-contained HTML page about a finished job, also written as
``<output>/report.html`` at the end of every run.

Files: ``timeline`` (the driver's sampler of throughput and memory, ``stats/timeline.json``),
``sample`` (a seeded document sample, its theta and labels, PCA), ``topics`` (sizes, intertopic
distance map, relevance bars), ``words`` (word neighbours, index recall), ``plots`` (matplotlib SVG
figures), ``page`` (HTML), ``build`` (the sections, from the manifest and the outputs).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from embedjob.layout import REPORT_HTML
from embedjob.storage import Storage

logger = logging.getLogger(__name__)


def write_report(out: Storage, dest: Optional[str] = None, *, label_column: Optional[str] = None,
                 input_storage_options: Optional[dict[str, Any]] = None) -> str:
    """Write the report of the output ``out`` to ``dest`` (a local path or URL; default
    ``<output>/report.html``) and return where it went::

        write_report(Storage("output/local"))  # -> 'output/local/report.html'
    """
    from embedjob.report.build import build_report  # matplotlib is imported only when a report is drawn

    text = build_report(out, label_column=label_column, input_storage_options=input_storage_options)
    if dest is None:
        out.write_text(REPORT_HTML, text)
        return out.url(REPORT_HTML)
    Storage(dest).write_text("", text)
    return dest


def write_run_report(out: Storage) -> Optional[str]:
    """:func:`write_report` at the end of a run: a report that cannot be drawn logs a warning and
    never fails the job."""
    try:
        where = write_report(out)
    except Exception as e:  # noqa: BLE001 - the job's outputs are complete without the report
        logger.warning("report: not written (%s: %s)", type(e).__name__, e)
        return None
    logger.info("report: %s", where)
    return where
