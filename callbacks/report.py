"""The end-of-fit report as one self-contained HTML page: ``diagnosis.html`` next to ``diagnosis.md``.

Owns :func:`render_html` (the findings coloured by severity with their suggestions, the monitors' figures
embedded as base64 PNG data URIs, the per-layer tables: one file, no script, no external asset, every
string escaped) and the helpers that build per-layer tables from a monitor's history (:func:`layer_rows`,
:func:`history_tables`: the tables of a monitor that does not write its own
:meth:`~lightning_convnets.callbacks.core.MonitorCallback.tables`; the BatchNorm monitor's
:func:`batchnorm_tables`). It imports nothing else of the package:
:class:`~lightning_convnets.callbacks.diagnosis.Diagnosis` gathers the findings, figures and tables at the
end of fit and calls :func:`render_html` from ``Diagnosis.write``. What the page shows: ``docs/monitors.md``.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "MAX_TABLE_ROWS",
    "PNG_SIGNATURE",
    "batchnorm_tables",
    "history_tables",
    "layer_rows",
    "png_data_uri",
    "render_html",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
"""The first eight bytes of every PNG file."""

MAX_TABLE_ROWS = 200
"""Rows shown per table: a longer one keeps this many, evenly spaced (first and last included), and says so."""

_SEVERITIES = ("error", "warning", "info")

# no "<" or "&" in the style sheet: the page stays well-formed XML (the tests parse it as such)
_STYLE = """
:root { --error: #b42318; --warning: #b54708; --info: #2e7d32; --line: #d0d5dd; --muted: #475467; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #101828;
       max-width: 1100px; margin: 0 auto; padding: 1.5em; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid var(--line); padding-bottom: 0.2em; margin-top: 2em; }
nav a { margin-right: 1em; }
.meta { color: var(--muted); margin: 0; }
.counts span { display: inline-block; margin-right: 0.6em; padding: 0.1em 0.6em; border-radius: 1em;
               color: #fff; font-weight: 600; }
.counts .error, .badge.error { background: var(--error); }
.counts .warning, .badge.warning { background: var(--warning); }
.counts .info, .badge.info { background: var(--info); }
.counts .none { background: #98a2b3; }
.finding { border: 1px solid var(--line); border-left: 6px solid var(--info); border-radius: 4px;
           padding: 0.6em 1em; margin: 0.8em 0; }
.finding.error { border-left-color: var(--error); background: #fef3f2; }
.finding.warning { border-left-color: var(--warning); background: #fffaeb; }
.finding h3 { font-size: 1em; margin: 0 0 0.3em 0; }
.badge { color: #fff; padding: 0.05em 0.5em; border-radius: 3px; font-size: 0.85em; margin-right: 0.5em; }
.finding p { margin: 0.3em 0; }
.finding .layers, .finding .step { color: var(--muted); font-size: 0.9em; }
.finding .suggestion { font-style: italic; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 0.9em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1.5em 0; }
th, td { border: 1px solid var(--line); padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f2f4f7; }
.note { color: var(--muted); font-size: 0.9em; }
code { font-size: 0.9em; }
@media print { .finding { break-inside: avoid; } figure { break-inside: avoid; } }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` of the PNG bytes ``png``.

    Raises:
        ValueError: when ``png`` does not start with the PNG signature.

    Example:
        >>> png_data_uri(PNG_SIGNATURE)
        'data:image/png;base64,iVBORw0KGgo='
    """
    if not bytes(png[:8]) == PNG_SIGNATURE:
        raise ValueError(
            f"png_data_uri: expected PNG bytes (starting {PNG_SIGNATURE!r}), got {bytes(png[:8])!r}"
        )
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def layer_rows(
    entry: Mapping[str, float], prefix: str, layers: Sequence[str], keys: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One row per layer of ``layers`` (in that order) that the history ``entry`` has a value for:
    ``{"layer": name, key: entry["<prefix>/<name>/<key>"], ...}`` for each of ``keys`` (default: every key
    the entry holds for that layer, in the entry's order).

    Example:
        >>> layer_rows({"m/a/var": 1.0, "m/a/dead": 0.0, "m/b/var": 2.0}, "m", ["a", "b", "c"])
        [{'layer': 'a', 'var': 1.0, 'dead': 0.0}, {'layer': 'b', 'var': 2.0}]
    """
    rows = []
    for name in layers:
        head = f"{prefix}/{name}/"
        if keys is None:
            values = {
                k[len(head) :]: v
                for k, v in entry.items()
                if k.startswith(head) and "/" not in k[len(head) :]
            }
        else:
            values = {k: entry[head + k] for k in keys if head + k in entry}
        if values:
            rows.append({"layer": name, **values})
    return rows


def history_tables(history: Sequence[Mapping[str, float]], prefix: str) -> dict[str, list[dict[str, Any]]]:
    """The tables of a monitor that writes none itself: its latest history entry as one row per layer (the
    keys ``<prefix>/<layer>/<metric>``, layers in the order they were logged) and its summary values (keys
    ``<prefix>/<metric>``) as one row per metric. ``{}`` without history.

    Example:
        >>> tables = history_tables([{"step": 5.0, "m/l1/var": 1.0, "m/l2/var": 3.0, "m/growth": 3.0}], "m")
        >>> tables["per layer at step 5"]
        [{'layer': 'l1', 'var': 1.0}, {'layer': 'l2', 'var': 3.0}]
        >>> tables["summary at step 5"]
        [{'metric': 'growth', 'value': 3.0}]
    """
    if not history:
        return {}
    entry = history[-1]
    head = f"{prefix}/"
    layers: dict[str, None] = {}
    summary = []
    for key, value in entry.items():
        if not key.startswith(head):
            continue
        rest = key[len(head) :]
        if "/" in rest:
            layers.setdefault(rest.rsplit("/", 1)[0], None)
        else:
            summary.append({"metric": rest, "value": value})
    step = int(entry.get("step", -1))
    tables: dict[str, list[dict[str, Any]]] = {}
    rows = layer_rows(entry, prefix, list(layers))
    if rows:
        tables[f"per layer at step {step}"] = rows
    if summary:
        tables[f"summary at step {step}"] = summary
    return tables


def batchnorm_tables(
    history: Sequence[Mapping[str, float]], prefix: str, sizes: Mapping[str, Mapping[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """The BatchNorm monitor's table: one row per layer of ``sizes`` (``layer -> {"channels": ...,
    "elements": ...}``, in that order) that the latest history entry has values for, with the sizes, the
    batch/running variance ratio (``exp`` of the logged ``log_var_ratio``; NaN without one) and the other
    logged keys of the layer. ``{}`` without history.

    Example:
        >>> entry = {"step": 8.0, "bn/l1/z_shift": 0.5, "bn/l1/log_var_ratio": 0.0, "bn/l1/mean_drift": 0.1}
        >>> batchnorm_tables([entry], "bn", {"l1": {"channels": 4, "elements": 64}})
        {'BN drift per layer at step 8': [{'layer': 'l1', 'channels': 4, 'elements': 64, 'var_ratio': 1.0, 'z_shift': 0.5, 'mean_drift': 0.1}]}
    """
    if not history:
        return {}
    last = history[-1]
    rows = []
    for row in layer_rows(last, prefix, list(sizes)):
        name, ratio = row.pop("layer"), row.pop("log_var_ratio", math.nan)
        rows.append({"layer": name, **sizes[name], "var_ratio": math.exp(ratio), **row})
    return {f"BN drift per layer at step {int(last['step'])}": rows}


# ------------------------------------------------------------------------------------------ rendering
def _cell(value: Any) -> tuple[str, bool]:
    """The text of a table cell and whether it is a number (right-aligned)."""
    if value is None:
        return "-", False
    if isinstance(value, bool):
        return ("yes" if value else "no"), False
    if isinstance(value, int):
        return str(value), True
    if isinstance(value, float):
        return ("-" if math.isnan(value) else f"{value:.4g}"), True
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d tensor / numpy scalar
        return _cell(value.item())
    return str(value), False


def _thin(rows: Sequence[Mapping[str, Any]], limit: int) -> list[Mapping[str, Any]]:
    if len(rows) <= limit:
        return list(rows)
    picks = sorted({round(i * (len(rows) - 1) / (limit - 1)) for i in range(limit)})
    return [rows[i] for i in picks]


def _table(title: str, rows: Sequence[Mapping[str, Any]], limit: int) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    shown = _thin(rows, limit)
    out = [f"<h4>{_esc(title)}</h4>"]
    if len(shown) < len(rows):
        out.append(f'<p class="note">{len(shown)} of {len(rows)} rows shown, evenly spaced.</p>')
    out.append('<div class="scroll"><table>')
    out.append("<thead><tr>" + "".join(f'<th scope="col">{_esc(c)}</th>' for c in columns) + "</tr></thead>")
    out.append("<tbody>")
    for row in shown:
        cells = []
        for column in columns:
            text, numeric = _cell(row.get(column))
            cells.append(f'<td class="num">{_esc(text)}</td>' if numeric else f"<td>{_esc(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return out


def _finding(index: int, f: Mapping[str, Any]) -> list[str]:
    severity = f.get("severity", "info")
    severity = severity if severity in _SEVERITIES else "info"
    kind = f.get("kind") or ""
    head = f'<span class="badge {severity}">{_esc(severity.upper())}</span>{_esc(f.get("monitor", ""))}'
    if kind:
        head += f" / <code>{_esc(kind)}</code>"
    out = [
        f'<article class="finding {severity}" id="finding-{index}">',
        f"<h3>{head}</h3>",
        f'<p class="message">{_esc(f.get("message", ""))}</p>',
    ]
    layers = list(f.get("layers") or [])
    if layers:
        out.append(
            '<p class="layers">layers: ' + ", ".join(f"<code>{_esc(n)}</code>" for n in layers) + "</p>"
        )
    if f.get("suggestion"):
        out.append(f'<p class="suggestion"><strong>Try:</strong> {_esc(f["suggestion"])}</p>')
    if f.get("step") is not None:
        out.append(f'<p class="step">step {_esc(f["step"])}</p>')
    out.append("</article>")
    return out


def render_html(
    findings: Sequence[Mapping[str, Any]],
    figures: Sequence[tuple[str, str, bytes]] = (),
    tables: Sequence[tuple[str, str, Sequence[Mapping[str, Any]]]] = (),
    title: str = "lightning-convnets diagnosis",
    meta: Mapping[str, Any] | None = None,
    max_rows: int = MAX_TABLE_ROWS,
) -> str:
    """The report as one HTML page: no script, no external asset (figures are data URIs), every string
    escaped, well-formed XML as well as HTML.

    Args:
        findings: the findings in the order to show them, as dicts (``dataclasses.asdict`` of each
            :class:`~lightning_convnets.callbacks.diagnosis.Finding`: ``severity``, ``monitor``, ``kind``,
            ``message``, ``layers``, ``suggestion``, ``step``).
        figures: ``(monitor, key, PNG bytes)`` of each figure, embedded in that order.
        tables: ``(monitor, title, rows)`` of each table; a row is a dict ``column -> value`` (numbers are
            shown with 4 significant digits, ``None``/NaN as ``-``); the columns are the union of the rows'
            keys in first-seen order.
        title: the page's title and heading.
        meta: a few ``label -> value`` lines under the heading (the step, the log folder).
        max_rows: rows shown per table (evenly spaced beyond it).

    Example:
        >>> page = render_html([{"severity": "warning", "monitor": "m", "message": "a < b", "layers": []}])
        >>> "a &lt; b" in page and "<script" not in page
        True
    """
    if max_rows < 2:
        raise ValueError(f"render_html: max_rows must be >= 2, got {max_rows}")
    counts = {s: sum(1 for f in findings if f.get("severity") == s) for s in _SEVERITIES}
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8" />',
        '<meta name="viewport" content="width=device-width, initial-scale=1" />',
        f"<title>{_esc(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{_esc(title)}</h1>",
    ]
    for label, value in (meta or {}).items():
        out.append(f'<p class="meta">{_esc(label)}: {_esc(value)}</p>')
    plural = {"error": "errors", "warning": "warnings", "info": "info"}
    summary = [
        f'<span class="{s if counts[s] else "none"}">{counts[s]} {s if counts[s] == 1 else plural[s]}</span>'
        for s in _SEVERITIES
    ]
    out.append('<p class="counts">' + "".join(summary) + "</p>")
    out.append(
        '<nav><a href="#findings">Findings</a><a href="#figures">Figures</a><a href="#tables">Tables</a></nav>'
    )
    out.append("</header>")
    out.append("<main>")
    out.append('<section id="findings"><h2>Findings</h2>')
    if not findings:
        out.append('<p class="note">No monitor reported anything.</p>')
    for i, f in enumerate(findings):
        out.extend(_finding(i, f))
    out.append("</section>")
    out.append('<section id="figures"><h2>Figures</h2>')
    if not figures:
        out.append('<p class="note">No monitor drew a figure.</p>')
    for monitor, key, png in figures:
        caption = f"{monitor}: {key}"
        out.append("<figure>")
        out.append(f'<img src="{png_data_uri(png)}" alt="{_esc(caption)}" />')
        out.append(f"<figcaption>{_esc(caption)}</figcaption>")
        out.append("</figure>")
    out.append("</section>")
    out.append('<section id="tables"><h2>Tables</h2>')
    if not tables:
        out.append('<p class="note">No monitor gave a table.</p>')
    current = None
    for monitor, name, rows in tables:
        if monitor != current:
            out.append(f"<h3>{_esc(monitor)}</h3>")
            current = monitor
        if rows:
            out.extend(_table(name, rows, max_rows))
        else:
            out.append(f'<h4>{_esc(name)}</h4><p class="note">(no rows)</p>')
    out.append("</section>")
    out.append("</main>")
    out.append("</body>")
    out.append("</html>")
    return "\n".join(out) + "\n"
