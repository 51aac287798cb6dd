"""One self-contained HTML report (plotly.js inline, no external URLs) over plain run rows."""

from __future__ import annotations

import html
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import pandas as pd
import plotly.graph_objects as go

from backend.reports import charts

MAX_LAYER_RUNS = 4
TABLE_COLUMNS = ("run_id", "model", "method", "sparsity", "pattern", "calibration", "nsamples", "seqlen", "seed",
                 "state", "overall_sparsity", "dense_ppl", "pruned_ppl", "ppl_ratio", "jsd", "kl_dense_pruned",
                 "kl_pruned_dense", "flip_rate", "code")
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem; color: #222; }
h1 { margin-bottom: 0.2rem; } .meta { color: #666; margin-top: 0; }
table.runs { border-collapse: collapse; font-size: 0.85rem; } .scroll { overflow-x: auto; }
table.runs th, table.runs td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; }
table.runs th { background: #f4f4f4; } .empty { font-size: 1.2rem; color: #a33; }
section { margin: 2rem 0; }
"""


def report_task(df: pd.DataFrame) -> str:
    """The task score the report leads with: the first of f1, em, rouge1, judge measured on a done run."""
    finished = charts.done(df)
    for task in ("f1", "em", "rouge1", "judge"):
        if finished[f"{task}_change"].notna().any():
            return task
    return "f1"


def runs_table(df: pd.DataFrame, task: str) -> str:
    """The runs as an escaped HTML table: settings, the key metrics and the task scores."""
    columns = [*TABLE_COLUMNS, f"dense_{task}", f"pruned_{task}", f"{task}_change", f"{task}_relative"]
    table = df.reindex(columns=columns).sort_values(["model", "method", "calibration", "sparsity"], na_position="last")
    return table.to_html(index=False, escape=True, na_rep=charts.MISSING, classes="runs", border=0,
                         float_format=lambda v: f"{v:.4g}")


def _section(heading: str, body: str) -> str:
    return f"<section><h2>{html.escape(heading)}</h2>\n{body}\n</section>"


def build_html(rows: charts.Rows, layers_by_run: Mapping[str, list[dict]] | None = None,
               title: str = "PruneScope report") -> str:
    """The report page as one HTML string; the first figure carries plotly.js inline, the rest reuse it."""
    df = charts.frame(rows)
    task = report_task(df)
    finished = charts.done(df)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    figures: list[go.Figure] = []

    def embed(fig: go.Figure) -> str:
        figures.append(fig)
        return fig.to_html(full_html=False, include_plotlyjs=len(figures) == 1, default_height="480px",
                           config={"displaylogo": False})

    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">Generated {stamp} · {len(df)} run(s), {len(finished)} finished</p>']
    if finished.empty:
        parts.append('<p class="empty">No finished runs yet.</p>')
    if not df.empty:
        parts.append(_section("Runs", f'<div class="scroll">{runs_table(df, task)}</div>'))
    if not finished.empty:
        parts.append(_section("Perplexity vs divergence", embed(charts.tradeoff_scatter(finished, task))))
        parts.append(_section("Against sparsity", "\n".join(
            embed(charts.metric_vs_sparsity(finished, m)) for m in ("ppl_ratio", "jsd", f"{task}_change"))))
        table = charts.predictors(finished, task)
        shown = table.to_html(index=False, escape=True, na_rep=charts.MISSING, classes="runs", border=0,
                              float_format=lambda v: f"{v:.3f}")
        parts.append(_section(f"Which metric predicts the {charts.TASK_LABELS[task]} drop?",
                              shown + embed(charts.predictors_chart(table, task))))
        layer_parts = []
        for run_id in [r for r in finished["run_id"] if (layers_by_run or {}).get(r)][:MAX_LAYER_RUNS]:
            layers = layers_by_run[run_id]
            value = "rel_error" if any(layer.get("rel_error") is not None for layer in layers) else "sparsity"
            layer_parts.append(embed(charts.layer_heatmap(layers, value, title=f"{run_id}: {value} per layer")))
        if layer_parts:
            parts.append(_section("Per layer", "\n".join(layer_parts)))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def write_report(rows: charts.Rows, out_path: str | os.PathLike,
                 layers_by_run: dict[str, list[dict]] | None = None, title: str = "PruneScope report") -> Path:
    """Write the report to out_path atomically (temp file in the same folder, then os.replace); returns the path."""
    target = Path(out_path).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    page = build_html(rows, layers_by_run, title)
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
