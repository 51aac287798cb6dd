"""Comparison charts over plain run rows (dicts): plotly figures and pandas tables, no UI or storage code. Charts
take the rows of one protocol (`backend.runs.protocol.comparable`); their hovers and axes say how it measured."""

from __future__ import annotations

import html
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from backend.runs.protocol import (
    LM_PREFIX,
    lm_parts,
    metric_note,
    metric_part,
    score_of,
)
from backend.runs.uncertainty import ROW_INTERVALS

TASKS = ("em", "f1", "rouge1", "judge")
TASK_LABELS = {"em": "exact match", "f1": "F1", "rouge1": "ROUGE-1", "judge": "judge score"}
NUMERIC = ("sparsity", "nsamples", "seqlen", "seed", "overall_sparsity", "dense_ppl", "pruned_ppl", "jsd",
           "kl_dense_pruned", "kl_pruned_dense", "flip_rate",
           *(f"{side}_{t}" for t in TASKS for side in ("dense", "pruned")))
TEXT = ("run_id", "model", "method", "pattern", "calibration", "allocation", "state")
METRICS: dict[str, str] = {
    "ppl_ratio": "perplexity ratio (pruned / dense)",
    "pruned_ppl": "pruned perplexity",
    "jsd": "Jensen-Shannon divergence",
    "kl_dense_pruned": "KL(dense‖pruned)",
    "kl_pruned_dense": "KL(pruned‖dense)",
    "flip_rate": "top-1 flip rate",
    "overall_sparsity": "measured sparsity",
    **{f"{t}_change": f"{TASK_LABELS[t]} change (pruned - dense)" for t in TASKS},
    **{f"{t}_relative": f"{TASK_LABELS[t]} kept (pruned / dense)" for t in TASKS},
    **{f"pruned_{t}": f"pruned {TASK_LABELS[t]}" for t in TASKS},
}
# short human names of run-row columns, for table headers and bar labels
LABELS: dict[str, str] = {
    "run_id": "run", "model": "model", "method": "method", "sparsity": "target sparsity", "pattern": "pattern",
    "calibration": "calibration", "allocation": "allocation", "overall_sparsity": "measured sparsity",
    "dense_ppl": "dense perplexity",
    "pruned_ppl": "pruned perplexity", "ppl_ratio": "perplexity ratio", "jsd": "JS divergence",
    "kl_dense_pruned": "KL(dense‖pruned)", "kl_pruned_dense": "KL(pruned‖dense)", "flip_rate": "top-1 flip rate",
    **{f"{side}_{t}": f"{side} {TASK_LABELS[t]}" for t in TASKS for side in ("dense", "pruned")},
    **{f"{t}_change": f"{TASK_LABELS[t]} change" for t in TASKS},
    **{f"{t}_relative": f"{TASK_LABELS[t]} kept" for t in TASKS},
}
LABELS.update({f"{column}_ci": f"{LABELS[column]} 95% interval" for column in list(LABELS)
               if column in ROW_INTERVALS})
DIVERGENCES = ("jsd", "kl_dense_pruned", "kl_pruned_dense", "answer_jsd")
LAYER_VALUES: dict[str, str] = {"rel_error": "relative reconstruction error", "sparsity": "sparsity",
                                "target": "target sparsity"}
PX_PER_LAYER = 22
METHOD_COLOURS = {"magnitude": "#636EFA", "wanda": "#EF553B", "sparsegpt": "#00CC96", "ria": "#AB63FA"}
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "star", "pentagon", "hexagon")
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
MISSING = "–"
Rows = Iterable[Mapping] | pd.DataFrame


def score_label(task: str) -> str:
    """A task score's human name: 'F1', or 'prunescope_facts acc (lm-eval)' for an lm-eval score."""
    if task in TASK_LABELS:
        return TASK_LABELS[task]
    name, metric = lm_parts(task)
    return f"{name} {metric} (lm-eval)"


def label(column: str) -> str:
    """A run-row column's human name, lm-eval scores' columns included."""
    if column in LABELS:
        return LABELS[column]
    key = score_of(column)
    if key is None:
        return column
    for prefix, form in (("dense_", "dense {}"), ("pruned_", "pruned {}")):
        if column.startswith(prefix):
            rest = column[len(prefix):]
            return form.format(score_label(key)) + (" stderr" if rest.endswith("_stderr") else
                                                   " 95% interval" if rest.endswith("_ci") else "")
    ends = {"_change_ci": "change 95% interval", "_change": "change", "_relative": "kept"}
    return next((f"{score_label(key)} {what}" for end, what in ends.items() if column.endswith(end)), column)


def metric_title(metric: str) -> str:
    """A chartable metric's title (METRICS, or one of an lm-eval score's columns)."""
    if metric in METRICS:
        return METRICS[metric]
    key = score_of(metric)
    if key is None:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    ends = {"_change": "change (pruned - dense)", "_relative": "kept (pruned / dense)"}
    return next((f"{score_label(key)} {what}" for end, what in ends.items() if metric.endswith(end)),
                f"pruned {score_label(key)}")


def lm_scores(df: pd.DataFrame) -> list[str]:
    """The lm-eval scores ('lm:task:metric') some row of a frame measured."""
    prefix = "dense_" + LM_PREFIX
    return sorted(c[len("dense_"):] for c in df.columns if c.startswith(prefix)
                  and not c.endswith(("_stderr", "_ci")) and df[c].notna().any())


def scores(rows: Rows) -> list[str]:
    """Every task score a page can pick for these rows: the instruction-task scores, then their lm-eval scores."""
    return [*TASKS, *lm_scores(frame(rows))]


def metrics_of(rows: Rows) -> dict[str, str]:
    """Every metric against sparsity with its title: METRICS, then each lm-eval score's change, kept and pruned."""
    keys = lm_scores(frame(rows))
    return {**METRICS, **{column: metric_title(column) for key in keys
                          for column in (f"{key}_change", f"{key}_relative", f"pruned_{key}")}}


def _ratio(num: pd.Series, den: pd.Series) -> pd.Series:
    """num / den, NaN where either is missing or den is 0."""
    return (num / den.where(den != 0)).astype(float)


def frame(rows: Rows) -> pd.DataFrame:
    """The rows as a DataFrame with every known column, plus ppl_ratio and per task {t}_change and {t}_relative."""
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict("records")
    df = pd.DataFrame([dict(r) for r in rows])
    for col in TEXT:
        df[col] = df[col].astype(object).where(df[col].notna(), None) if col in df else None
    df["allocation"] = df["allocation"].fillna("uniform")  # runs stored before targets existed were uniform
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float) if col in df else np.nan
    df["ppl_ratio"] = _ratio(df["pruned_ppl"], df["dense_ppl"])
    harness = [c[len("dense_"):] for c in df.columns if c.startswith("dense_" + LM_PREFIX)
               and not c.endswith(("_stderr", "_ci"))]
    for key in harness:
        for column in (f"dense_{key}", f"pruned_{key}", f"dense_{key}_stderr", f"pruned_{key}_stderr"):
            df[column] = pd.to_numeric(df[column], errors="coerce").astype(float) if column in df else np.nan
    for t in (*TASKS, *harness):
        df[f"{t}_change"] = df[f"pruned_{t}"] - df[f"dense_{t}"]
        df[f"{t}_relative"] = _ratio(df[f"pruned_{t}"], df[f"dense_{t}"])
    intervals = df["intervals"] if "intervals" in df else pd.Series([None] * len(df), index=df.index, dtype=object)
    bounded = {**ROW_INTERVALS, **{column: key for t in harness for column, key in (
        (f"dense_{t}", f"dense.{t}"), (f"pruned_{t}", f"pruned.{t}"), (f"{t}_change", f"delta.{t}"))}}
    for column, key in bounded.items():
        df[f"{column}_ci"] = [(i or {}).get(key) if isinstance(i, Mapping) else None for i in intervals]
    return df


def with_score(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """The frame with every column a task score's charts read, empty where no run measured it."""
    for column in (f"dense_{task}", f"pruned_{task}", f"{task}_change", f"{task}_relative", f"{task}_change_ci"):
        if column not in df:
            df[column] = np.nan if not column.endswith("_ci") else None
    return df


def interval_text(bounds, spec: str = ".3g") -> str:
    """'[low, high]' of an interval, or a dash when there is none."""
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2 or any(b is None for b in bounds):
        return MISSING
    return f"[{format(bounds[0], spec)}, {format(bounds[1], spec)}]"


def error_bars(values: Sequence[float], bounds: Sequence) -> dict | None:
    """Plotly asymmetric error bars from each value's [low, high] (none where a value has no interval); None when no
    value has one."""
    plus, minus = [], []
    for value, bound in zip(values, bounds):
        ok = isinstance(bound, (list, tuple)) and len(bound) == 2 and value is not None and np.isfinite(value)
        plus.append(max(bound[1] - value, 0.0) if ok else None)
        minus.append(max(value - bound[0], 0.0) if ok else None)
    if all(p is None for p in plus):
        return None
    return dict(type="data", symmetric=False, array=plus, arrayminus=minus, thickness=1.2, width=3)


def done(rows: Rows) -> pd.DataFrame:
    """frame() of the rows (plain rows or a DataFrame), keeping only runs whose state is "done"."""
    df = frame(rows)
    return df[df["state"] == "done"].reset_index(drop=True)


def _fmt(value, spec: str = ".4g") -> str:
    """A number for hover text, or a dash when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return format(value, spec)


def _colours(methods: Sequence[str]) -> dict[str, str]:
    """A stable colour per method: fixed for the known ones, the Plotly palette for the rest."""
    palette = [c for c in qualitative.Plotly if c not in METHOD_COLOURS.values()]
    others = sorted(m for m in set(methods) if m not in METHOD_COLOURS)
    return {**METHOD_COLOURS, **{m: palette[i % len(palette)] for i, m in enumerate(others)}}


def rows_protocol(rows: Rows, protocol: Mapping | None = None) -> Mapping:
    """`protocol` when given, else the protocol every row shares ({} when they differ or do not say)."""
    if protocol is not None:
        return protocol
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame([dict(r) for r in rows])
    if df.empty or "protocol_key" not in df or "protocol" not in df or df["protocol_key"].nunique(dropna=False) != 1:
        return {}
    return df["protocol"].iloc[0] or {}


def unit(metric: str, protocol: Mapping) -> str | None:
    """The unit of a divergence metric (nats or bits) as the protocol records it; None for the other metrics."""
    if metric not in DIVERGENCES:
        return None
    return (protocol.get("divergence") or {}).get("unit")


def axis_title(metric: str, protocol: Mapping) -> str:
    """A metric's axis title with its unit, e.g. 'Jensen-Shannon divergence (nats)'."""
    name = METRICS.get(metric) or label(metric)
    return f"{name} ({unit(metric, protocol)})" if unit(metric, protocol) else name


def note_html(metric: str, protocol: Mapping) -> str:
    """metric_note() as escaped hover text, its unit and its protocol on separate lines."""
    return html.escape(metric_note(metric, protocol)).replace("; ", "<br>  ")


def _nice(step: float) -> float:
    """The smallest 1, 2 or 5 x 10^k at least `step`."""
    power = 10.0 ** math.floor(math.log10(step))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= step * (1 - 1e-9))


def log_axis(values: Iterable[float], max_ticks: int = 6) -> dict:
    """Range and ticks of a log axis over the positive values whose labels never overlap: 1-2-5 per decade over a
    wide range, even steps with just enough decimals over a narrow one (a single run included)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and x > 0], dtype=float)
    if not v.size:
        return dict(type="log")
    a, b = math.log10(v.min()), math.log10(v.max())
    span = max(b - a, 0.02)
    middle, half = (a + b) / 2, span / 2 + 0.1 * span
    a, b = middle - half, middle + half
    lo, hi = 10.0 ** a, 10.0 ** b
    if b - a > 0.7:
        for mantissas in ((1, 2, 5), (1, 3), (1,)):
            ticks = [m * 10.0 ** e for e in range(math.floor(a), math.ceil(b) + 1) for m in mantissas
                     if lo <= m * 10.0 ** e <= hi]
            if len(ticks) <= max_ticks:
                break
        ticks = ticks[::math.ceil(len(ticks) / max_ticks)]
        text = [format(t, "g").replace("e+0", "e").replace("e+", "e") for t in ticks]
    else:
        step = _nice((hi - lo) / (max_ticks - 1))
        ticks = [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
        decimals = max(0, -math.floor(math.log10(step)))
        text = [f"{t:.{decimals}f}" for t in ticks]
    return dict(type="log", range=[a, b], tickvals=ticks, ticktext=text)


def _empty(title: str, message: str) -> go.Figure:
    """A blank figure with a centred message, for charts with nothing to show."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5, font_size=14)
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False)
    return fig


def _hover(row: pd.Series, task: str, js_unit: str | None = None) -> str:
    """Hover text of one run: identity, settings and the key metrics (divergences in `js_unit`)."""
    label = score_label(task)
    in_unit = f" {js_unit}" if js_unit else ""
    return "<br>".join([
        f"<b>{row['run_id']}</b> {row['model'] or ''}",
        f"{row['method']} · {row['pattern'] or MISSING} · sparsity {_fmt(row['sparsity'], '.2f')}"
        f" (measured {_fmt(row['overall_sparsity'], '.3f')})",
        f"calibration {row['calibration'] or MISSING} · {_fmt(row['nsamples'], '.0f')} x {_fmt(row['seqlen'], '.0f')}"
        f" · seed {_fmt(row['seed'], '.0f')}",
        f"ppl {_fmt(row['dense_ppl'], '.2f')} → {_fmt(row['pruned_ppl'], '.2f')} (x{_fmt(row['ppl_ratio'], '.3f')}"
        f" {interval_text(row['ppl_ratio_ci'])})",
        f"JSD {_fmt(row['jsd'], '.4f')} {interval_text(row['jsd_ci'])} · KL d‖p {_fmt(row['kl_dense_pruned'], '.3f')}"
        f" · KL p‖d {_fmt(row['kl_pruned_dense'], '.3f')}{in_unit} · flips {_fmt(row['flip_rate'], '.3f')}",
        f"{label} {_fmt(row[f'dense_{task}'], '.3f')} → {_fmt(row[f'pruned_{task}'], '.3f')}"
        f" (kept {_fmt(row[f'{task}_relative'], '.0%')}; change {_fmt(row[f'{task}_change'], '+.3f')}"
        f" {interval_text(row[f'{task}_change_ci'])})",
        "[low, high]: 95% bootstrap intervals (ratio and change paired over the same units)",
    ])


def _check_task(task: str) -> None:
    if task not in TASKS and not task.startswith(LM_PREFIX):
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)} or an lm-eval score "
                         f"({LM_PREFIX}task:metric)")


def tradeoff_scatter(rows: Rows, task: str = "f1", protocol: Mapping | None = None) -> go.Figure:
    """Perplexity ratio (log x) vs JSD of done runs of one protocol (default: the one the rows share): colour =
    method, symbol = calibration, size = sparsity, label = task score kept (pruned / dense); hovers and axes say
    the units and how each was measured. customdata[0] of each point is its run_id."""
    _check_task(task)
    title = f"Perplexity vs divergence (labels: {score_label(task)} kept, pruned / dense)"
    protocol = rows_protocol(rows, protocol)
    df = with_score(done(rows), task)
    df = df[(df["ppl_ratio"] > 0) & df["jsd"].notna()]
    if df.empty:
        return _empty(title, "no finished runs with both perplexity and JSD yet")
    notes = (f"<br><br><i>x</i>: {note_html('ppl_ratio', protocol)}<br><i>y</i>: {note_html('jsd', protocol)}"
             f"<br><i>labels</i>: {html.escape(label(f'{task}_relative'))} = pruned / dense "
             f"{html.escape(score_label(task))}, each a {note_html(f'pruned_{task}', protocol)}")
    colours = _colours(df["method"].fillna(MISSING).tolist())
    df["calibration"] = df["calibration"].fillna(MISSING)
    several = df["allocation"].nunique() > 1
    kinds = sorted({(c, a) for c, a in zip(df["calibration"], df["allocation"])})
    fig = go.Figure()
    for (method, calibration, allocation), group in df.groupby([df["method"].fillna(MISSING), "calibration",
                                                                "allocation"], sort=True):
        fig.add_trace(go.Scatter(
            x=group["ppl_ratio"], y=group["jsd"], mode="markers+text",
            name=" · ".join([method, calibration, *([allocation] if several else [])]),
            legendgroup=method, legendgrouptitle_text=method,
            marker=dict(color=colours[method], symbol=SYMBOLS[kinds.index((calibration, allocation)) % len(SYMBOLS)],
                        size=(8 + 24 * group["sparsity"].fillna(0.0)).tolist(), opacity=0.85,
                        line=dict(width=1, color="white")),
            text=[_fmt(v, ".0%") for v in group[f"{task}_relative"]], textposition="top center", textfont_size=10,
            customdata=[[r] for r in group["run_id"]], cliponaxis=False,
            error_x=error_bars(group["ppl_ratio"].tolist(), group["ppl_ratio_ci"].tolist()),
            error_y=error_bars(group["jsd"].tolist(), group["jsd_ci"].tolist()),
            hovertext=[_hover(r, task, unit("jsd", protocol)) for _, r in group.iterrows()],
            hovertemplate="%{hovertext}" + notes + "<extra></extra>",
        ))
    fig.update_layout(title=title, xaxis_title="perplexity ratio (pruned / dense, log scale); bars: 95% intervals",
                      yaxis_title=axis_title("jsd", protocol),
                      legend_title_text="method · calibration" + (" · allocation" if several else "")
                                        + " (size = sparsity)")
    fig.update_xaxes(**log_axis(df["ppl_ratio"]))
    fig.update_yaxes(rangemode="tozero")
    return fig


def metric_vs_sparsity(rows: Rows, metric: str, protocol: Mapping | None = None) -> go.Figure:
    """One line per method (colour) and calibration (dash) of a metric against target sparsity (in [0, 1]), done
    runs of one protocol only (default: the one the rows share); runs sharing a point are averaged. A point of one
    run carries its 95% interval as an error bar (an average of several has none)."""
    title = f"{metric_title(metric)} vs sparsity"
    protocol = rows_protocol(rows, protocol)
    note = f"<br><br>{note_html(metric, protocol)}" if metric_part(metric) else ""
    df = done(rows)
    key = score_of(metric)
    if key is not None:
        df = with_score(df, key)
    df = df[df[metric].notna() & df["sparsity"].notna()]
    if df.empty:
        return _empty(title, f"no finished runs with {metric} yet")
    keys = ["model", "method", "calibration", "pattern", "allocation"]
    df[keys] = df[keys].fillna(MISSING)
    several_models = df["model"].nunique() > 1
    colours = _colours(df["method"].tolist())
    kinds = sorted({(c, a) for c, a in zip(df["calibration"], df["allocation"])})
    allocations = sorted(df["allocation"].unique())
    patterns = sorted(df["pattern"].unique())
    df["run_id"] = df["run_id"].astype(str)
    df["ci"] = df[f"{metric}_ci"] if f"{metric}_ci" in df else None
    averaged = df.groupby([*keys, "sparsity"], sort=True).agg(value=(metric, "mean"), n=(metric, "size"),
                                                              runs=("run_id", ", ".join),
                                                              ci=("ci", "first")).reset_index()
    averaged["ci"] = [ci if n == 1 else None for ci, n in zip(averaged["ci"], averaged["n"])]
    fig = go.Figure()
    for (model, method, calibration, pattern, allocation), points in averaged.groupby(keys, sort=True):
        name = " · ".join([*([model] if several_models else []), method, calibration,
                           *([pattern] if len(patterns) > 1 else []), *([allocation] if len(allocations) > 1 else [])])
        fig.add_trace(go.Scatter(
            x=points["sparsity"], y=points["value"], mode="lines+markers", name=name, legendgroup=method,
            line=dict(color=colours[method], dash=DASHES[kinds.index((calibration, allocation)) % len(DASHES)]),
            marker=dict(symbol=SYMBOLS[patterns.index(pattern) % len(SYMBOLS)], size=8),
            customdata=np.column_stack([points["n"], points["runs"], [interval_text(c) for c in points["ci"]]]),
            cliponaxis=False, error_y=error_bars(points["value"].tolist(), points["ci"].tolist()),
            hovertemplate=f"{html.escape(name)}<br>sparsity %{{x:.2f}}<br>{html.escape(axis_title(metric, protocol))}"
                          " %{y:.4g} %{customdata[2]}<br>%{customdata[0]} run(s): %{customdata[1]}" + note
                          + "<extra></extra>",
        ))
    fig.update_layout(title=title, xaxis_title="target sparsity", yaxis_title=axis_title(metric, protocol),
                      legend_title_text="method · calibration" + (" · allocation" if len(allocations) > 1 else ""))
    fig.update_xaxes(range=[0, 1], tickformat=".0%", dtick=0.1)
    if metric == "ppl_ratio":
        fig.update_yaxes(**log_axis(averaged["value"]))
    return fig


def predictors_chart(table: pd.DataFrame, task: str | None = None) -> go.Figure:
    """Grouped bars of a predictors table (backend.findings.predictors.ranking): Spearman and Kendall per candidate
    metric, in [-1, 1], each with its bootstrap interval as an error bar."""
    what = f"{score_label(task)} drop" if task else "task drop"
    title = f"Which metric predicts the {what}? (rank correlation across runs, 95% intervals)"
    if table.empty or table[["spearman", "kendall"]].isna().all().all():
        notes = "; ".join(sorted(set(n for n in table.get("note", []) if n))) or "no runs"
        return _empty(title, f"not enough runs to correlate: {notes}")
    fig = go.Figure()
    names = [LABELS.get(m, m) for m in table["metric"]]
    for column, name in (("spearman", "Spearman ρ"), ("kendall", "Kendall τ")):
        values = table[column].astype(float)
        bounds = [[lo, hi] if np.isfinite(lo) and np.isfinite(hi) else None
                  for lo, hi in zip(table[f"{column}_low"].astype(float), table[f"{column}_high"].astype(float))]
        hover = [f"n = {n} runs · 95% interval {interval_text(b, '.2f')}" + (f"<br>{html.escape(note)}" if note else "")
                 for n, note, b in zip(table["n"], table["note"], bounds)]
        fig.add_trace(go.Bar(x=names, y=values, name=name, hovertext=hover, customdata=table["metric"],
                             text=[_fmt(v, ".2f") for v in values], textposition="outside", cliponaxis=False,
                             error_y=error_bars(values.tolist(), bounds),
                             hovertemplate="%{x}: %{y:.3f}<br>%{hovertext}<extra>" + name + "</extra>"))
    fig.update_layout(title=title, barmode="group", yaxis_range=[-1.25, 1.25], yaxis_title="rank correlation",
                      xaxis_title="metric", margin_t=90)
    return fig


def _grid(layers: Iterable[Mapping], value: str) -> pd.DataFrame:
    """Per-layer rows pivoted to a layer (rows) x module (columns) table of value, modules in first-seen order."""
    df = pd.DataFrame([dict(r) for r in layers])
    if df.empty:
        return pd.DataFrame()
    numeric = [c for c in df.columns if c not in ("layer", "module") and pd.api.types.is_numeric_dtype(df[c])]
    values = pd.to_numeric(df[value], errors="coerce") if value in df.columns else None
    if values is None or value in ("layer", "module") or (values.isna().all() and df[value].notna().any()):
        raise ValueError(f"unknown layer value {value!r}: use one of {', '.join(numeric) or 'rel_error, sparsity'}")
    df[value] = values.astype(float)
    grid = df.pivot_table(index="layer", columns="module", values=value, aggfunc="mean", dropna=False, sort=False)
    return grid.reindex(index=sorted(grid.index), columns=list(dict.fromkeys(df["module"])))


def _heatmap(grid: pd.DataFrame, title: str, colour_title: str, **trace) -> go.Figure:
    """A layer x module heatmap tall enough (PX_PER_LAYER per layer, at least 400 px) that every layer reads."""
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(dtype=float), x=[str(m) for m in grid.columns],
                               y=[int(layer) for layer in grid.index], hoverongaps=False,
                               colorbar=dict(title=dict(text=colour_title, side="right")),
                               hovertemplate=f"layer %{{y}} · %{{x}}<br>{html.escape(colour_title)} %{{z:.4g}}"
                                             "<extra></extra>", **trace))
    fig.update_layout(title=title, xaxis_title="module", yaxis_title="decoder layer",
                      height=max(400, PX_PER_LAYER * len(grid.index) + 160))
    fig.update_yaxes(autorange="reversed", dtick=1 if len(grid.index) <= 80 else None)
    return fig


def layer_heatmap(layers: Iterable[Mapping], value: str = "rel_error", title: str | None = None) -> go.Figure:
    """Decoder layer (y) x module (x) heatmap of one per-layer value (rel_error or sparsity), its colour bar titled
    with the value's human name."""
    name = LAYER_VALUES.get(value, value)
    title = title or f"{name} per layer and module"
    grid = _grid(layers, value)
    if grid.empty:
        return _empty(title, "no per-layer rows")
    return _heatmap(grid, title, name, colorscale="Viridis")


def layer_allocation(layers: Iterable[Mapping], allocation: Mapping | None = None,
                     title: str = "Sparsity per decoder layer: target and reached") -> go.Figure:
    """Per decoder layer, the parameter-weighted sparsity reached beside its target (uniform, OWL's or explicit),
    and OWL's outlier ratios on a second axis when the run has them."""
    df = pd.DataFrame([dict(r) for r in layers])
    if df.empty:
        return _empty(title, "no per-layer rows")
    df["numel"] = df["rows"] * df["cols"] if "rows" in df else 1
    df["zeros"] = pd.to_numeric(df["sparsity"], errors="coerce") * df["numel"]
    df["goal"] = pd.to_numeric(df["target"], errors="coerce") * df["numel"] if "target" in df else np.nan
    per = df.groupby("layer", sort=True)[["zeros", "goal", "numel"]].sum(min_count=1)
    layer = per.index.tolist()
    fig = go.Figure(go.Scatter(x=layer, y=(per["zeros"] / per["numel"]).tolist(), mode="lines+markers", name="reached",
                               hovertemplate="layer %{x}<br>reached %{y:.4f}<extra></extra>"))
    if per["goal"].notna().any():
        fig.add_trace(go.Scatter(x=layer, y=(per["goal"] / per["numel"]).tolist(), mode="lines+markers", name="target",
                                 line=dict(dash="dash"), hovertemplate="layer %{x}<br>target %{y:.4f}<extra></extra>"))
    ratios = list((allocation or {}).get("outlier_ratios") or [])
    if ratios:
        fig.add_trace(go.Bar(x=list(range(len(ratios))), y=[100 * r for r in ratios], name="outlier ratio (%)",
                             yaxis="y2", opacity=0.3, marker_color="#888",
                             hovertemplate="layer %{x}<br>outlier ratio %{y:.3f}%<extra></extra>"))
        fig.update_layout(yaxis2=dict(title=f"OWL outlier ratio, % of scores above {allocation.get('owl_m', 5):g} x "
                                            f"the layer mean", overlaying="y", side="right", rangemode="tozero",
                                      showgrid=False))
    fig.update_layout(title=title, xaxis_title="decoder layer", yaxis_title="sparsity (parameter-weighted)",
                      legend=dict(orientation="h", y=-0.2), yaxis_range=[0, 1])
    return fig


def layer_difference(a_layers: Iterable[Mapping], b_layers: Iterable[Mapping], value: str = "rel_error",
                     title: str | None = None) -> go.Figure:
    """Heatmap of a - b over the (layer, module) cells both runs have, diverging colours centred at 0."""
    name = LAYER_VALUES.get(value, value)
    title = title or f"{name} difference (a - b) per layer and module"
    a, b = _grid(a_layers, value), _grid(b_layers, value)
    if a.empty or b.empty:
        return _empty(title, "no per-layer rows in one of the runs")
    layers = [layer for layer in a.index if layer in b.index]
    modules = [m for m in a.columns if m in b.columns]
    if not layers or not modules:
        return _empty(title, "the two runs share no (layer, module) cell")
    diff = a.loc[layers, modules] - b.loc[layers, modules]
    return _heatmap(diff, title, f"{name}, a - b", colorscale="RdBu_r", zmid=0)
