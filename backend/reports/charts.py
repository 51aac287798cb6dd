"""Comparison charts over plain run rows (dicts): plotly figures and pandas tables, no UI or storage code."""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from scipy import stats

TASKS = ("em", "f1", "rouge1", "judge")
TASK_LABELS = {"em": "exact match", "f1": "F1", "rouge1": "ROUGE-1", "judge": "judge score"}
NUMERIC = ("sparsity", "nsamples", "seqlen", "seed", "overall_sparsity", "dense_ppl", "pruned_ppl", "jsd",
           "kl_dense_pruned", "kl_pruned_dense", "flip_rate",
           *(f"{side}_{t}" for t in TASKS for side in ("dense", "pruned")))
TEXT = ("run_id", "model", "method", "pattern", "calibration", "state")
PREDICTORS = ("ppl_ratio", "jsd", "kl_dense_pruned", "kl_pruned_dense", "flip_rate")
METRICS: dict[str, str] = {
    "ppl_ratio": "perplexity ratio (pruned / dense)",
    "pruned_ppl": "pruned perplexity",
    "jsd": "Jensen-Shannon divergence",
    "kl_dense_pruned": "KL(dense || pruned)",
    "kl_pruned_dense": "KL(pruned || dense)",
    "flip_rate": "top-1 flip rate",
    "overall_sparsity": "measured sparsity",
    **{f"{t}_change": f"{TASK_LABELS[t]} change (pruned - dense)" for t in TASKS},
    **{f"{t}_relative": f"{TASK_LABELS[t]} kept (pruned / dense)" for t in TASKS},
    **{f"pruned_{t}": f"pruned {TASK_LABELS[t]}" for t in TASKS},
}
METHOD_COLOURS = {"magnitude": "#636EFA", "wanda": "#EF553B", "sparsegpt": "#00CC96"}
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "star", "pentagon", "hexagon")
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
MISSING = "–"
Rows = Iterable[Mapping] | pd.DataFrame


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
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float) if col in df else np.nan
    df["ppl_ratio"] = _ratio(df["pruned_ppl"], df["dense_ppl"])
    for t in TASKS:
        df[f"{t}_change"] = df[f"pruned_{t}"] - df[f"dense_{t}"]
        df[f"{t}_relative"] = _ratio(df[f"pruned_{t}"], df[f"dense_{t}"])
    return df


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


def _empty(title: str, message: str) -> go.Figure:
    """A blank figure with a centred message, for charts with nothing to show."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5, font_size=14)
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False)
    return fig


def _hover(row: pd.Series, task: str) -> str:
    """Hover text of one run: identity, settings and the key metrics."""
    label = TASK_LABELS.get(task, task)
    return "<br>".join([
        f"<b>{row['run_id']}</b> {row['model'] or ''}",
        f"{row['method']} · {row['pattern'] or MISSING} · sparsity {_fmt(row['sparsity'], '.2f')}"
        f" (measured {_fmt(row['overall_sparsity'], '.3f')})",
        f"calibration {row['calibration'] or MISSING} · {_fmt(row['nsamples'], '.0f')} x {_fmt(row['seqlen'], '.0f')}"
        f" · seed {_fmt(row['seed'], '.0f')}",
        f"ppl {_fmt(row['dense_ppl'], '.2f')} → {_fmt(row['pruned_ppl'], '.2f')} (x{_fmt(row['ppl_ratio'], '.3f')})",
        f"JSD {_fmt(row['jsd'], '.4f')} · KL d‖p {_fmt(row['kl_dense_pruned'], '.3f')}"
        f" · KL p‖d {_fmt(row['kl_pruned_dense'], '.3f')} · flips {_fmt(row['flip_rate'], '.3f')}",
        f"{label} {_fmt(row[f'dense_{task}'], '.3f')} → {_fmt(row[f'pruned_{task}'], '.3f')}"
        f" (kept {_fmt(row[f'{task}_relative'], '.0%')})",
    ])


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")


def tradeoff_scatter(rows: Rows, task: str = "f1") -> go.Figure:
    """Perplexity ratio (log x) vs JSD of done runs: colour = method, symbol = calibration, size = sparsity,
    label = task score kept (pruned / dense). customdata[0] of each point is its run_id."""
    _check_task(task)
    title = f"Perplexity vs divergence (labels: {TASK_LABELS[task]} kept, pruned / dense)"
    df = done(rows)
    df = df[(df["ppl_ratio"] > 0) & df["jsd"].notna()]
    if df.empty:
        return _empty(title, "no finished runs with both perplexity and JSD yet")
    colours = _colours(df["method"].fillna(MISSING).tolist())
    calibrations = sorted(df["calibration"].fillna(MISSING).unique())
    fig = go.Figure()
    for (method, calibration), group in df.groupby([df["method"].fillna(MISSING), df["calibration"].fillna(MISSING)],
                                                   sort=True):
        fig.add_trace(go.Scatter(
            x=group["ppl_ratio"], y=group["jsd"], mode="markers+text", name=f"{method} · {calibration}",
            legendgroup=method, legendgrouptitle_text=method,
            marker=dict(color=colours[method], symbol=SYMBOLS[calibrations.index(calibration) % len(SYMBOLS)],
                        size=(8 + 24 * group["sparsity"].fillna(0.0)).tolist(), opacity=0.85,
                        line=dict(width=1, color="white")),
            text=[_fmt(v, ".0%") for v in group[f"{task}_relative"]], textposition="top center", textfont_size=10,
            customdata=[[r] for r in group["run_id"]],
            hovertext=[_hover(r, task) for _, r in group.iterrows()], hovertemplate="%{hovertext}<extra></extra>",
        ))
    fig.update_layout(title=title, xaxis_title="perplexity ratio (pruned / dense, log)",
                      yaxis_title="Jensen-Shannon divergence", legend_title_text="method · calibration (size = sparsity)")
    fig.update_xaxes(type="log")
    return fig


def metric_vs_sparsity(rows: Rows, metric: str) -> go.Figure:
    """One line per method (colour) and calibration (dash) of a metric against target sparsity, done runs only;
    runs sharing a point are averaged."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    title = f"{METRICS[metric]} vs sparsity"
    df = done(rows)
    df = df[df[metric].notna() & df["sparsity"].notna()]
    if df.empty:
        return _empty(title, f"no finished runs with {metric} yet")
    keys = ["model", "method", "calibration", "pattern"]
    df[keys] = df[keys].fillna(MISSING)
    several_models = df["model"].nunique() > 1
    colours = _colours(df["method"].tolist())
    calibrations = sorted(df["calibration"].unique())
    patterns = sorted(df["pattern"].unique())
    df["run_id"] = df["run_id"].astype(str)
    averaged = df.groupby([*keys, "sparsity"], sort=True).agg(value=(metric, "mean"), n=(metric, "size"),
                                                              runs=("run_id", ", ".join)).reset_index()
    fig = go.Figure()
    for (model, method, calibration, pattern), points in averaged.groupby(keys, sort=True):
        name = " · ".join([*([model] if several_models else []), method, calibration,
                           *([pattern] if len(patterns) > 1 else [])])
        fig.add_trace(go.Scatter(
            x=points["sparsity"], y=points["value"], mode="lines+markers", name=name, legendgroup=method,
            line=dict(color=colours[method], dash=DASHES[calibrations.index(calibration) % len(DASHES)]),
            marker=dict(symbol=SYMBOLS[patterns.index(pattern) % len(SYMBOLS)], size=8),
            customdata=np.column_stack([points["n"], points["runs"]]),
            hovertemplate=f"{name}<br>sparsity %{{x:.2f}}<br>{metric} %{{y:.4g}}"
                          "<br>%{customdata[0]} run(s): %{customdata[1]}<extra></extra>",
        ))
    fig.update_layout(title=title, xaxis_title="target sparsity", yaxis_title=METRICS[metric],
                      legend_title_text="method · calibration")
    if metric == "ppl_ratio":
        fig.update_yaxes(type="log")
    return fig


def predictors(rows: Rows, task: str = "f1") -> pd.DataFrame:
    """Spearman and Kendall rank correlation, over done runs, of each candidate metric with the task score's drop
    (dense - pruned); NaN and a note when fewer than 3 runs or a constant input."""
    _check_task(task)
    df = done(rows)
    drop = df[f"dense_{task}"] - df[f"pruned_{task}"]
    table = []
    for metric in PREDICTORS:
        both = pd.DataFrame({"x": df[metric], "y": drop}).dropna()
        row = {"metric": metric, "spearman": np.nan, "spearman_p": np.nan, "kendall": np.nan, "kendall_p": np.nan,
               "n": len(both), "note": ""}
        if len(both) < 3:
            row["note"] = f"fewer than 3 runs with {metric} and {task}"
        elif both["x"].nunique() < 2 or both["y"].nunique() < 2:
            row["note"] = f"constant {metric if both['x'].nunique() < 2 else task + ' drop'} across runs"
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                spearman = stats.spearmanr(both["x"], both["y"])
                kendall = stats.kendalltau(both["x"], both["y"])
            row.update(spearman=float(spearman.statistic), spearman_p=float(spearman.pvalue),
                       kendall=float(kendall.statistic), kendall_p=float(kendall.pvalue))
        table.append(row)
    return pd.DataFrame(table, columns=["metric", "spearman", "spearman_p", "kendall", "kendall_p", "n", "note"])


def predictors_chart(table: pd.DataFrame, task: str | None = None) -> go.Figure:
    """Grouped bars of predictors(): Spearman and Kendall per candidate metric, in [-1, 1]."""
    what = f"{TASK_LABELS.get(task, task)} drop" if task else "task drop"
    title = f"Which metric predicts the {what}? (rank correlation across runs)"
    if table.empty or table[["spearman", "kendall"]].isna().all().all():
        notes = "; ".join(sorted(set(n for n in table.get("note", []) if n))) or "no runs"
        return _empty(title, f"not enough runs to correlate: {notes}")
    fig = go.Figure()
    hover = [f"n = {n}" + (f"<br>{note}" if note else "") for n, note in zip(table["n"], table["note"])]
    for column, name in (("spearman", "Spearman ρ"), ("kendall", "Kendall τ")):
        fig.add_trace(go.Bar(x=table["metric"], y=table[column], name=name, hovertext=hover,
                             text=[_fmt(v, ".2f") for v in table[column]], textposition="outside",
                             hovertemplate="%{x}: %{y:.3f}<br>%{hovertext}<extra>" + name + "</extra>"))
    fig.update_layout(title=title, barmode="group", yaxis_range=[-1.1, 1.1], yaxis_title="rank correlation",
                      xaxis_title="metric")
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


def _heatmap(grid: pd.DataFrame, title: str, **trace) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(dtype=float), x=[str(m) for m in grid.columns],
                               y=[int(layer) for layer in grid.index], hoverongaps=False,
                               hovertemplate="layer %{y} · %{x}<br>%{z:.4g}<extra></extra>", **trace))
    fig.update_layout(title=title, xaxis_title="module", yaxis_title="decoder layer")
    fig.update_yaxes(autorange="reversed", dtick=1 if len(grid.index) <= 40 else None)
    return fig


def layer_heatmap(layers: Iterable[Mapping], value: str = "rel_error", title: str | None = None) -> go.Figure:
    """Decoder layer (y) x module (x) heatmap of one per-layer value (rel_error or sparsity)."""
    title = title or f"{value} per layer and module"
    grid = _grid(layers, value)
    if grid.empty:
        return _empty(title, "no per-layer rows")
    return _heatmap(grid, title, colorscale="Viridis", colorbar_title=value)


def layer_difference(a_layers: Iterable[Mapping], b_layers: Iterable[Mapping], value: str = "rel_error",
                     title: str | None = None) -> go.Figure:
    """Heatmap of a - b over the (layer, module) cells both runs have, diverging colours centred at 0."""
    title = title or f"{value} difference (a - b) per layer and module"
    a, b = _grid(a_layers, value), _grid(b_layers, value)
    if a.empty or b.empty:
        return _empty(title, "no per-layer rows in one of the runs")
    layers = [layer for layer in a.index if layer in b.index]
    modules = [m for m in a.columns if m in b.columns]
    if not layers or not modules:
        return _empty(title, "the two runs share no (layer, module) cell")
    diff = a.loc[layers, modules] - b.loc[layers, modules]
    return _heatmap(diff, title, colorscale="RdBu_r", zmid=0, colorbar_title="a - b")
