"""One self-contained HTML report (plotly.js inline, no external URLs) over plain run rows; runs measured with
different protocols never share a chart, table or correlation: each protocol gets its own section."""

from __future__ import annotations

import html
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import pandas as pd
import plotly.graph_objects as go

from backend.findings.evidence import Evidence
from backend.findings.predictors import ranking
from backend.reports import charts
from backend.reports.rows import progress_text
from backend.runs.protocol import groups, protocol_label

MAX_LAYER_RUNS = 4
TABLE_COLUMNS = ("run_id", "model", "method", "sparsity", "pattern", "allocation", "calibration", "nsamples", "seqlen",
                 "seed", "state", "overall_sparsity", "dense_ppl", "pruned_ppl", "ppl_ratio", "jsd", "kl_dense_pruned",
                 "kl_pruned_dense", "flip_rate", "code")
PENDING_COLUMNS = ("run_id", "model", "method", "sparsity", "pattern", "allocation", "calibration", "state", "progress",
                   "message")
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem; color: #222; }
h1 { margin-bottom: 0.2rem; } .meta { color: #666; margin-top: 0; }
table.runs { border-collapse: collapse; font-size: 0.85rem; } .scroll { overflow-x: auto; }
table.runs th, table.runs td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; }
table.runs th { background: #f4f4f4; } .empty { font-size: 1.2rem; color: #a33; }
section { margin: 2rem 0; } section.protocol { border-top: 3px solid #ddd; padding-top: 0.5rem; }
"""


def report_task(df: pd.DataFrame) -> str:
    """The task score the report leads with: the first of f1, em, rouge1, judge measured on a done run."""
    finished = charts.done(df)
    for task in ("f1", "em", "rouge1", "judge", *charts.lm_scores(finished)):
        if finished[f"{task}_change"].notna().any():
            return task
    return "f1"


def runs_table(df: pd.DataFrame, task: str) -> str:
    """The runs as an escaped HTML table: settings, the key metrics, the task scores and every lm-eval score (dense
    and pruned with lm-eval's stderr, and the change with its paired interval)."""
    harness = [c for key in charts.lm_scores(df) if key != task
               for c in (f"dense_{key}", f"dense_{key}_stderr", f"pruned_{key}", f"pruned_{key}_stderr",
                         f"{key}_change", f"{key}_change_ci")]
    columns = [*TABLE_COLUMNS, f"dense_{task}", f"pruned_{task}", f"{task}_change", f"{task}_relative", *harness]
    df = charts.with_score(df.copy(), task)
    for column in (c for c in columns if c.endswith("_ci") and c in df):
        df[column] = [charts.interval_text(b, ".4g") if isinstance(b, (list, tuple)) else None for b in df[column]]
    table = df.reindex(columns=columns).sort_values(["model", "method", "calibration", "sparsity"], na_position="last")
    table.columns = [charts.label(c) if c.startswith(("dense_lm:", "pruned_lm:", "lm:")) else c
                     for c in table.columns]
    return table.to_html(index=False, escape=True, na_rep=charts.MISSING, classes="runs", border=0,
                         float_format=lambda v: f"{v:.4g}")


def protocol_groups(rows: charts.Rows) -> list[dict]:
    """The finished runs grouped by protocol, largest group first: each group's key, label and run ids, so a report
    (and whoever reads it) knows which runs were compared with which."""
    finished = [r for r in _plain(rows) if r.get("state") == "done"]
    return [{"protocol_key": key, "protocol": protocol_label(members[0].get("protocol") or {}),
             "runs": [r["run_id"] for r in members]} for key, members in groups(finished)]


def _plain(rows: charts.Rows) -> list[dict]:
    return rows.to_dict("records") if isinstance(rows, pd.DataFrame) else [dict(r) for r in rows]


def _section(heading: str, body: str, level: int = 2, css: str = "") -> str:
    css = f' class="{css}"' if css else ""
    return f"<section{css}><h{level}>{html.escape(heading)}</h{level}>\n{body}\n</section>"


def _groups_table(found: list[dict]) -> str:
    table = pd.DataFrame([{"group": i, "protocol": g["protocol"], "runs": len(g["runs"]),
                           "run ids": ", ".join(g["runs"])} for i, g in enumerate(found, 1)])
    return table.to_html(index=False, escape=True, classes="runs", border=0)


def _pending_table(rows: list[dict]) -> str:
    table = pd.DataFrame([{**{c: r.get(c) for c in PENDING_COLUMNS}, "progress": progress_text(r)} for r in rows],
                         columns=list(PENDING_COLUMNS))
    return table.to_html(index=False, escape=True, na_rep=charts.MISSING, classes="runs", border=0)


def build_html(rows: charts.Rows, layers_by_run: Mapping[str, list[dict]] | None = None,
               title: str = "PruneScope report", units_by_run: Mapping[str, Mapping | None] | None = None) -> str:
    """The report page as one HTML string: one section per protocol (largest first) with its own table, charts and
    correlations (with bootstrap intervals over each run's `units_by_run`), then the unfinished runs and per-layer
    heatmaps; the first figure carries plotly.js inline."""
    plain = _plain(rows)
    finished = [r for r in plain if r.get("state") == "done"]
    pending = [r for r in plain if r.get("state") != "done"]
    found = protocol_groups(finished)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    figures: list[go.Figure] = []

    def embed(fig: go.Figure) -> str:
        figures.append(fig)
        return fig.to_html(full_html=False, include_plotlyjs=len(figures) == 1, default_height="480px",
                           config={"displaylogo": False})

    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">Generated {stamp} · {len(plain)} run(s), {len(finished)} finished, measured with '
             f'{len(found)} protocol(s)</p>']
    if not finished:
        parts.append('<p class="empty">No finished runs yet.</p>')
    else:
        note = ("Runs measured with different data, windows, records or templates are not comparable: each protocol "
                "below has its own table, charts and correlations.")
        parts.append(_section("Protocols", f"<p>{html.escape(note)}</p>\n{_groups_table(found)}"))
    by_id = {r["run_id"]: r for r in finished}
    for number, group in enumerate(found, 1):
        df = charts.frame([by_id[rid] for rid in group["runs"]])
        task = report_task(df)
        members = [by_id[rid] for rid in group["runs"]]
        evidence = [Evidence(r, (units_by_run or {})[r["run_id"]]) for r in members
                    if (units_by_run or {}).get(r["run_id"])]
        ranked = ranking(evidence, task)
        left = len(members) - len(evidence)
        table = ranked.table
        shown = (f"<p>{html.escape(ranked.sentence())}" + (f" {left} run(s) without per-example values are left out."
                                                          if left else "") + "</p>\n"
                 + table.to_html(index=False, escape=True, na_rep=charts.MISSING, classes="runs", border=0,
                                 float_format=lambda v: f"{v:.3f}"))
        body = "\n".join([
            _section("Runs", f'<div class="scroll">{runs_table(df, task)}</div>', 3),
            _section("Perplexity vs divergence", embed(charts.tradeoff_scatter(df, task)), 3),
            _section("Against sparsity", "\n".join(
                embed(charts.metric_vs_sparsity(df, m)) for m in ("ppl_ratio", "jsd", f"{task}_change")), 3),
            _section(f"Which metric predicts the {charts.score_label(task)} drop?",
                     shown + embed(charts.predictors_chart(table, task)), 3)])
        heading = f"Protocol {number} of {len(found)}: {group['protocol']} · {len(group['runs'])} run(s)"
        parts.append(_section(heading, body, 2, "protocol"))
    if pending:
        parts.append(_section("Runs not finished", f'<div class="scroll">{_pending_table(pending)}</div>'))
    layer_parts = []
    for run_id in [r["run_id"] for r in finished if (layers_by_run or {}).get(r["run_id"])][:MAX_LAYER_RUNS]:
        layers = layers_by_run[run_id]
        value = "rel_error" if any(layer.get("rel_error") is not None for layer in layers) else "sparsity"
        layer_parts.append(embed(charts.layer_heatmap(layers, value, title=f"{run_id}: {value} per layer")))
    if layer_parts:
        parts.append(_section("Per layer", "\n".join(layer_parts)))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def write_report(rows: charts.Rows, out_path: str | os.PathLike,
                 layers_by_run: dict[str, list[dict]] | None = None, title: str = "PruneScope report",
                 units_by_run: Mapping[str, Mapping | None] | None = None) -> Path:
    """Write the report to out_path atomically (temp file in the same folder, then os.replace); returns the path."""
    target = Path(out_path).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    page = build_html(rows, layers_by_run, title, units_by_run)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
