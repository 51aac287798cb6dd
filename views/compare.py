"""Compare: finished runs side by side, relative to their dense model; the filters live in the URL, to share a view."""

from __future__ import annotations

import os

import streamlit as st

from backend.reports import charts
from views.common import filter_rows, filter_value, finished_runs_or_stop, selected_run

FILTERS = {"model": "Model", "method": "Method", "calibration": "Calibration", "sparsity": "Sparsity",
           "pattern": "Pattern"}
TABLE = ["run_id", "model", "method", "sparsity", "pattern", "calibration", "overall_sparsity", "dense_ppl",
         "pruned_ppl", "ppl_ratio", "jsd", "kl_dense_pruned", "kl_pruned_dense", "flip_rate"]

st.title("📈 Compare")


def url_multiselect(field: str, title: str, options: list[str]) -> list[str]:
    """A multiselect whose choice is the URL's repeated query parameter `field` (empty: every value)."""
    wanted = [v for v in st.query_params.get_all(field) if v in options]
    picked = st.multiselect(title, options, default=wanted, key=f"filter-{field}", placeholder="all",
                            format_func=lambda v: os.path.basename(v.rstrip("/")) or v)
    if picked != st.query_params.get_all(field):
        if picked:
            st.query_params[field] = picked
        else:
            st.query_params.pop(field, None)
    return picked


def url_select(title: str, options: list[str], key: str, labels: dict[str, str], default: str | None = None) -> str:
    """A selectbox whose choice is the URL's query parameter `key` (else `default`, else the first option)."""
    wanted = st.query_params.get(key, default)
    chosen = st.selectbox(title, options, index=options.index(wanted) if wanted in options else 0,
                          key=f"choice-{key}", format_func=lambda v: labels.get(v, v))
    if st.query_params.get(key) != chosen:
        st.query_params[key] = chosen
    return chosen


rows = finished_runs_or_stop("compare it")

columns = st.columns(len(FILTERS) + 1)
chosen = {}
for column, (field, title) in zip(columns, FILTERS.items()):
    with column:
        chosen[field] = url_multiselect(field, title, sorted({filter_value(r, field) for r in rows}))
with columns[-1]:
    task = url_select("Task score", list(charts.TASKS), "task", charts.TASK_LABELS, default="f1")
shown = filter_rows(rows, chosen)
st.caption(f"{len(shown)} of {len(rows)} finished runs match the filters.")
if not shown:
    st.warning("No finished run matches these filters: widen them.")
    st.stop()

st.subheader("Perplexity vs divergence")
st.caption("Click a point to open that run's generations.")
scatter = charts.tradeoff_scatter(shown, task)
event = st.plotly_chart(scatter, on_select="rerun", selection_mode="points", key="tradeoff")
clicked = selected_run(event, scatter)
if clicked is None:
    st.session_state.pop("compare-opened", None)
elif clicked != st.session_state.get("compare-opened"):
    st.session_state["compare-opened"] = clicked
    st.switch_page("views/generations.py", query_params={"run": clicked})

st.subheader("Each metric relative to dense")
table = charts.done(shown)
table["model"] = [os.path.basename(str(m).rstrip("/")) or m for m in table["model"]]
picked = st.dataframe(
    table[TABLE + [f"dense_{task}", f"pruned_{task}", f"{task}_change", f"{task}_relative"]], hide_index=True,
    on_select="rerun", selection_mode="single-row", key="relative",
    column_config={"sparsity": st.column_config.NumberColumn(format="%.2f"),
                   "overall_sparsity": st.column_config.NumberColumn("measured sparsity", format="%.3f"),
                   f"{task}_relative": st.column_config.NumberColumn(format="percent")})
selected_rows = picked["selection"]["rows"] if picked else []
if selected_rows:
    rid = table.iloc[selected_rows[0]]["run_id"]
    left, right = st.columns(2)
    left.page_link("views/generations.py", label=f"Generations of {rid[:8]}", icon="💬", query_params={"run": rid})
    right.page_link("views/layers.py", label=f"Layers of {rid[:8]}", icon="🧱", query_params={"run": rid})
else:
    st.caption("Select a row to open its generations or layers.")

st.subheader("Metric vs sparsity")
metric = url_select("Metric", list(charts.METRICS), "metric", charts.METRICS)
st.plotly_chart(charts.metric_vs_sparsity(shown, metric), key="curves")

st.subheader("Which metric predicts the task loss?")
st.caption(f"Rank correlation, across the runs shown, of each metric with the drop in {charts.TASK_LABELS[task]} "
           "(dense - pruned).")
predicting = charts.predictors(shown, task)
st.dataframe(predicting, hide_index=True, key="predictors")
st.plotly_chart(charts.predictors_chart(predicting, task), key="predictors-chart")
