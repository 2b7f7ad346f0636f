"""The report's HTML: one self-contained page (inline CSS and SVG, no script, nothing fetched)."""

from __future__ import annotations

import html
import json
from typing import Any, Optional

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:18px 24px 60px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 6px}.sub{color:#666;font-size:13px}
section{background:#fff;border:1px solid #e3e5e8;border-radius:8px;padding:6px 18px 14px;margin:14px 0}
table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}
th{color:#555;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;color:#fff}
.ok{background:#3b8b4b}.partial{background:#c7861d}.failed{background:#c23b3b}
.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;font-size:13px}.kv b{color:#555;font-weight:600}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:10px}
.card{border:1px solid #e3e5e8;border-radius:6px;padding:8px 10px;font-size:12px}
.card h4{margin:0 0 4px;font-size:13px}.words{color:#333;margin-bottom:6px}
.bar{display:grid;grid-template-columns:90px 1fr;align-items:center;gap:4px;margin:1px 0}
.bar span{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.track{position:relative;height:10px;background:#e9ecef;border-radius:2px}
.track i{position:absolute;left:0;top:0;bottom:0;background:#d9534f;border-radius:2px}
.track u{position:absolute;left:0;top:0;bottom:0;background:#b9c4cf;border-radius:2px}
.plot svg{max-width:100%;height:auto}.flex{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start}
.err{color:#a52a2a}code{background:#f0f1f3;padding:0 3px;border-radius:3px}
"""


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def num(x: Any, digits: int = 1) -> str:
    """A number for a table: thousands separators, ``digits`` decimals for floats, '-' for None."""
    if x is None or x == "":
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:,.{3 if abs(x) < 1 and x != int(x) else digits}f}"
    return esc(x)


def table(head: list[str], rows: list[list[Any]], numeric: Optional[set[int]] = None) -> str:
    numeric = numeric or set()
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="n">{num(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def kv(pairs: list[tuple[str, Any]]) -> str:
    return '<div class="kv">' + "".join(f"<b>{esc(k)}</b><span>{v if isinstance(v, Markup) else num(v)}</span>"
                                        for k, v in pairs if v is not None) + "</div>"


class Markup(str):
    """HTML that :func:`kv` inserts as it is."""


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{body}</section>'


def plot(svg: str, caption: str = "") -> str:
    cap = f'<div class="sub">{esc(caption)}</div>' if caption else ""
    return f'<div class="plot">{svg}{cap}</div>'


def absent(what: str) -> str:
    return f'<p class="sub">{esc(what)}</p>'


def topic_cards(view: dict[str, Any], max_cards: int = 60) -> str:
    """A card per topic: size, coherence, top words and LDAvis-style relevance bars."""
    prevalence, share = view.get("prevalence") or [], view.get("dominant_share") or []
    bars = view.get("bars") or []
    cards = []
    for i, t in enumerate((view.get("topics") or [])[:max_cards]):
        size = f"{100 * prevalence[i]:.1f}% of tokens" if i < len(prevalence) else ""
        if i < len(share):
            size += f", dominant in {100 * share[i]:.1f}% of sampled docs"
        coh = " · ".join(f"{name} {t[key]:.3f}" for key, name in (("npmi", "NPMI"), ("c_v", "C_V"))
                         if isinstance(t.get(key), (int, float)))
        rows = ""
        if i < len(bars) and bars[i]:
            top = max(max(b["corpus"] or 0.0, b["topic"]) for b in bars[i]) or 1.0
            for b in bars[i]:
                corpus = b["corpus"] if b["corpus"] is not None else b["topic"]
                rows += (f'<div class="bar" title="{esc(b["word"])}: ~{b["topic"]:.0f} in this topic, '
                         f'{corpus:.0f} in the corpus"><span>{esc(b["word"])}</span><div class="track">'
                         f'<u style="width:{100 * corpus / top:.1f}%"></u><i style="width:{100 * b["topic"] / top:.1f}%">'
                         "</i></div></div>")
        cards.append(f'<div class="card"><h4>Topic {i}</h4><div class="sub">{esc(size)}<br>{esc(coh)}</div>'
                     f'<div class="words">{esc(", ".join(t.get("words", [])[:10]))}</div>{rows}</div>')
    more = len(view.get("topics") or []) - max_cards
    tail = absent(f"{more} more topic(s) in topics/topics.json") if more > 0 else ""
    return '<div class="cards">' + "".join(cards) + "</div>" + tail


def neighbours_table(view: dict[str, Any]) -> str:
    head = ["word"] + [f"{n} neighbours" for n in view["names"]]
    rows = [[r["word"]] + [", ".join(f"{w} ({s:.2f})" for w, s in r[k]) for k in view["kinds"]] for r in view["rows"]]
    sizes = ", ".join(f"{n}: {view['sizes'][k]:,} words" for k, n in zip(view["kinds"], view["names"]))
    return table(head, rows) + absent(f"cosine similarity in brackets; vocabularies {sizes}")


def page(title: str, header: str, sections: list[str], data: dict[str, Any]) -> str:
    """The whole document; ``data`` (small, numbers only) is embedded as JSON for scripts that read it."""
    blob = json.dumps(data, default=str, separators=(",", ":")).replace("</", "<\\/")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>{header}{''.join(sections)}"
            f'<script type="application/json" id="embedjob-report-data">{blob}</script></main></body></html>\n')
