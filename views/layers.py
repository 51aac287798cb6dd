"""Layers: per decoder layer and module, how much a run pruned and how far each pruned layer's output moved; and the
difference between two runs (e.g. the same method calibrated on C4 vs Alpaca)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from backend.reports import charts
from views.common import finished_runs_or_stop, label, pick_run, store

VALUES = charts.LAYER_VALUES

st.title("🧱 Layers")
db = store()
rows = finished_runs_or_stop("look at its layers")

run = pick_run(rows, key="run")
wanted = st.query_params.get("value")
value = st.radio("Value", list(VALUES), index=list(VALUES).index(wanted) if wanted in VALUES else 0,
                 format_func=VALUES.get, horizontal=True, key="layer-value")
if st.query_params.get("value") != value:
    st.query_params["value"] = value

layers = db.layers(run["run_id"])
if not layers:
    st.caption("This run has no per-layer report.")
else:
    st.plotly_chart(charts.layer_heatmap(layers, value, title=f"{VALUES[value]} · {label(run)}"), key="heatmap")
    allocation = ((db.metrics(run["run_id"]) or {}).get("prune") or {}).get("allocation") or {}
    st.plotly_chart(charts.layer_allocation(layers, allocation), key="allocation")
    st.caption(f"Allocation: {run.get('allocation') or 'uniform'}. "
               + ("OWL gives each decoder layer a sparsity from its outlier ratio (the share of its |W|·‖X‖ scores "
                  "above M x their mean, measured on the dense model): more outliers, less pruned; the "
                  "parameter-weighted mean stays at the run's sparsity." if allocation.get("outlier_ratios") else
                  "Each matrix's target is the run's sparsity unless the run set per-layer targets.")
               + " A row's count of zeros is rounded down, so a layer can sit just under its target.")
    with st.expander("Per-layer rows"):
        st.dataframe(pd.DataFrame(layers).drop(columns=["run_id"], errors="ignore"), hide_index=True)

# only runs of the same model have the same decoder layers and modules to subtract cell by cell
others = [r for r in rows if r["run_id"] != run["run_id"] and r["model"] == run["model"]] if layers else []
if not others:
    st.caption("No other finished run of this model with a per-layer report to compare with." if layers else
               "Without a per-layer report this run has nothing to compare with another run.")
else:
    st.subheader("Compare with another run")
    # the same pruning with another calibration first: the comparison this view is for
    others.sort(key=lambda r: (r["method"], r["sparsity"], r["pattern"]) !=
                (run["method"], run["sparsity"], run["pattern"]))
    other = pick_run(others, key="vs", title="Compare with", optional=True)
    if other is None:
        st.caption("Pick a second run to see the per-layer difference (this run minus that one), e.g. the same "
                   "method calibrated on other data.")
    else:
        st.plotly_chart(charts.layer_difference(layers, db.layers(other["run_id"]), value,
                                                title=f"{VALUES[value]}: {run['run_id'][:8]} - {other['run_id'][:8]}"),
                        key="difference")
        st.caption(f"a = {label(run)}  \nb = {label(other)}")
