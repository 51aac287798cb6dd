"""Compare: finished runs side by side, relative to their dense model; only runs measured with one protocol share a
chart, table or correlation. The filters and the protocol live in the URL, to share a view."""

from __future__ import annotations

import os

import streamlit as st

from backend.findings.predictors import MIN_RUNS
from backend.reports import charts
from backend.runs.protocol import (
    KEY_FIELDS,
    comparable,
    groups,
    metric_note,
    metric_part,
    part_label,
    protocol_label,
)
from views.common import (
    filter_rows,
    filter_value,
    finished_runs_or_stop,
    md_escape,
    paired_differences,
    pick_run,
    predictor_ranking,
    selected_run,
    store,
    url_multiselect,
    url_select,
)

FILTERS = {"model": "Model", "method": "Method", "calibration": "Calibration", "sparsity": "Sparsity",
           "pattern": "Pattern", "allocation": "Allocation"}
# the relative table's columns, {task} filled with the chosen task score; the others stay on the run's own pages
TABLE = ["run_id", "model", "method", "sparsity", "pattern", "allocation", "calibration", "dense_ppl", "pruned_ppl",
         "ppl_ratio", "ppl_ratio_ci", "jsd", "jsd_ci", "kl_dense_pruned", "flip_rate", "pruned_{task}",
         "{task}_relative", "{task}_change", "{task}_change_ci"]
# columns left out of the table, and named once above it, when every run shown has the same value
REPEATED = ("model", "method", "sparsity", "pattern", "allocation", "calibration", "dense_ppl")
FORMATS = {"sparsity": "%.2f", "dense_ppl": "%.2f", "pruned_ppl": "%.2f", "ppl_ratio": "%.3f", "jsd": "%.3g",
           "kl_dense_pruned": "%.3g", "flip_rate": "%.3f", "pruned_{task}": "%.3f", "{task}_relative": "percent",
           "{task}_change": "%+.3f"}
INTERVAL_HELP = ("95% bootstrap interval, paired over the same units (perplexity: windows; divergence: samples; "
                 "task scores: examples)")
CORRELATION = {"metric": "metric", "spearman": "Spearman ρ", "spearman_ci": "ρ 95% interval",
               "spearman_p": "p (Spearman)", "kendall": "Kendall τ", "kendall_ci": "τ 95% interval",
               "kendall_p": "p (Kendall)", "n": "runs", "note": "note"}
NUMBERS = ("spearman", "spearman_p", "kendall", "kendall_p")

st.title("📈 Compare")


def relative_table(rows: list[dict], task: str, protocol: dict) -> None:
    """The runs' metrics relative to dense, with human column names and each metric's unit and protocol on hover,
    settings every run shares said once above instead of repeated; a selected row links to that run's pages."""
    table = charts.with_score(charts.done(rows), task)
    columns = [c.format(task=task) for c in TABLE]
    shown = table[columns].copy()
    shown["run_id"] = shown["run_id"].str[:8]
    shown["model"] = [os.path.basename(str(m).rstrip("/")) or m for m in shown["model"]]
    for column in columns:
        if column.endswith("_ci"):
            shown[column] = [charts.interval_text(b) for b in shown[column]]
    config = {}
    for template, column in zip(TABLE, columns):
        note = (metric_note(column, protocol) if metric_part(column) else
                INTERVAL_HELP if column.endswith("_ci") else None)
        form = FORMATS.get(template)
        config[column] = (st.column_config.NumberColumn(charts.label(column), format=form, help=note) if form else
                          st.column_config.TextColumn(charts.label(column), help=note))
    unmeasured = [c for c in columns if metric_part(c) and metric_part(c) not in protocol]
    same = [c for c in REPEATED if len(shown) > 1 and shown[c].nunique(dropna=False) == 1 and c not in unmeasured]
    if same:
        st.caption("Same for every run shown: " + " · ".join(
            f"{charts.label(c)} {FORMATS[c] % shown[c].iloc[0] if c in FORMATS else shown[c].iloc[0]}" for c in same))
    hidden = {*same, *unmeasured, *(f"{c}_ci" for c in unmeasured)}
    picked = st.dataframe(shown, hide_index=True, width="stretch", on_select="rerun", selection_mode="single-row",
                          key="relative", column_config=config, placeholder=charts.MISSING,
                          column_order=[c for c in columns if c not in hidden])
    if unmeasured:
        st.caption("Not measured in this protocol: " + ", ".join(charts.label(c) for c in unmeasured) + ".")
    selected = picked["selection"]["rows"] if picked else []
    if selected:
        rid = table.iloc[selected[0]]["run_id"]
        left, right = st.columns(2)
        left.page_link("views/generations.py", label=f"Generations of {rid[:8]}", icon="💬", query_params={"run": rid})
        right.page_link("views/layers.py", label=f"Layers of {rid[:8]}", icon="🧱", query_params={"run": rid})
    else:
        st.caption("Select a row to open its generations or layers.")


def correlations(rows: list[dict], task: str) -> None:
    """Rank correlation of each metric with the task drop, with bootstrap intervals, when enough runs allow it."""
    if len(rows) < MIN_RUNS:
        st.info(f"A rank correlation needs at least {MIN_RUNS} runs measured with one protocol; {len(rows)} shown.")
        return
    found = predictor_ranking(tuple(r["run_id"] for r in rows), task, str(store().root))
    st.caption(f"Rank correlation, across the {len(found['runs'])} runs shown that keep per-example values, of each "
               f"metric with the drop in {charts.score_label(task)} (dense - pruned); intervals: 95% bootstrap over "
               f"the windows, samples and examples every run was measured on, each run's metrics recomputed."
               + (f" {found['left_out']} run(s) without per-example values are left out." if found["left_out"] else ""))
    predicting = found["table"]
    st.markdown(md_escape(found["sentence"]))
    shown = predicting.assign(metric=[charts.LABELS.get(m, m) for m in predicting["metric"]],
                              **{f"{c}_ci": [charts.interval_text([lo, hi], ".2f") for lo, hi in
                                             zip(predicting[f"{c}_low"], predicting[f"{c}_high"])]
                                 for c in ("spearman", "kendall")})
    st.dataframe(shown, hide_index=True, width="stretch", key="predictors", placeholder=charts.MISSING,
                 column_order=list(CORRELATION),
                 column_config={c: st.column_config.NumberColumn(label, format="%.3f") if c in NUMBERS
                                else st.column_config.Column(label) for c, label in CORRELATION.items()})
    if predicting[["spearman", "kendall"]].notna().any().any():
        st.plotly_chart(charts.predictors_chart(predicting, task), key="predictors-chart")
    else:
        st.info("No metric can be correlated with these runs: "
                + "; ".join(sorted({n for n in predicting["note"] if n})) + ".")


rows = finished_runs_or_stop("compare it")

columns = st.columns(len(FILTERS) + 1)
chosen = {}
for column, (field, title) in zip(columns, FILTERS.items()):
    with column:
        chosen[field] = url_multiselect(field, title, sorted({filter_value(r, field) for r in rows}))
matching = filter_rows(rows, chosen)
with columns[-1]:
    scores = charts.scores(matching or rows)
    task = url_select("Task score", scores, "task", {s: charts.score_label(s) for s in scores}, default="f1")
st.caption(f"{len(matching)} of {len(rows)} finished runs match the filters.")
if not matching:
    st.warning("No finished run matches these filters: widen them.")
    st.stop()

found = groups(matching)
key = found[0][0]
if len(found) > 1:
    labels = {k: f"{protocol_label(g[0].get('protocol') or {})} · {len(g)} run(s)" for k, g in found}
    key = url_select("Protocol (how the runs were measured)", [k for k, _ in found], "protocol", labels, default=key)
shown, left_out = comparable(matching, key)
protocol = shown[0].get("protocol") or {}
if left_out:
    st.warning(left_out)
st.markdown(f"**Measured with** protocol `{key}` ({len(shown)} run(s)):\n"
            + ("\n".join(f"- {md_escape(part_label(part, protocol[part]))}" for part in KEY_FIELDS if part in protocol)
               or f"- {md_escape(protocol_label(protocol))}"))

st.subheader("Perplexity vs divergence")
st.caption("Click a point to open that run's generations; hover a point for its units and protocol.")
scatter = charts.tradeoff_scatter(shown, task, protocol)
event = st.plotly_chart(scatter, on_select="rerun", selection_mode="points", key="tradeoff")
clicked = selected_run(event, scatter)
if clicked is None:
    st.session_state.pop("compare-opened", None)
elif clicked != st.session_state.get("compare-opened"):
    st.session_state["compare-opened"] = clicked
    st.switch_page("views/generations.py", query_params={"run": clicked})

st.subheader("Each metric relative to dense")
relative_table(shown, task, protocol)

st.subheader("Two runs, paired")
st.caption("Run B minus run A for each pruned metric, with a 95% bootstrap interval paired over the units both were "
           "scored on (perplexity: windows; divergence: samples; task scores: examples): for instance C4 vs Alpaca "
           "calibration of one method.")
if len(shown) < 2:
    st.info("A paired comparison needs two runs measured with one protocol.")
else:
    left, right = st.columns(2)
    with left:
        first = pick_run(shown, "a", "Run A")
    with right:
        second = pick_run([r for r in shown if r["run_id"] != first["run_id"]], "b", "Run B")
    paired = paired_differences(first["run_id"], second["run_id"], str(store().root))
    if isinstance(paired, str):
        st.info(f"These runs cannot be paired: {paired}.")
    else:
        st.dataframe(paired, hide_index=True, width="stretch", key="paired", placeholder=charts.MISSING,
                     column_config={"B - A": st.column_config.NumberColumn(format="%+.4g")})

st.subheader("Metric vs sparsity")
choices = charts.metrics_of(shown)
metric = url_select("Metric", list(choices), "metric", choices)
st.plotly_chart(charts.metric_vs_sparsity(shown, metric, protocol), key="curves")

st.subheader("Which metric predicts the task loss?")
correlations(shown, task)
