"""Runs: every run in the store, newest first, with its state, progress, protocol and error; for the run picked
below the table: open it on the other pages, download its results and its pruned model, rebuild or delete it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import streamlit as st

from backend.reports import downloads
from backend.reports.rows import runs_table, when
from backend.runs import cleanup
from backend.runs.protocol import protocol_label
from backend.runs.store import ACTIVE, STATES, Store, StoreError
from views.common import confirmed_delete, label, md_escape, pick_run, store
from views.progress import show_progress

ENDED = ("failed", "interrupted", "cancelled")

st.title("🗂️ Runs")
db = store()


def deferred(build: Callable[[Store], bytes], root: Path) -> Callable[[], bytes]:
    """A download's bytes built only when its button is clicked, from a store connection of its own (Streamlit
    calls it on another thread)."""
    def make() -> bytes:
        own = Store(root)
        try:
            return build(own)
        finally:
            own.close()
    return make


def state_filter(rows: list[dict]) -> list[str]:
    """A multiselect of the states present, kept in the URL's repeated query parameter `state` (empty: all)."""
    options = [s for s in (*STATES, "new") if any(r["state"] == s for r in rows)]
    wanted = [s for s in st.query_params.get_all("state") if s in options]
    picked = st.multiselect("State", options, default=wanted, key="filter-state", placeholder="all")
    if picked != st.query_params.get_all("state"):
        if picked:
            st.query_params["state"] = picked
        else:
            st.query_params.pop("state", None)
    return picked


@st.fragment(run_every=2.0)
def live_progress(rid: str) -> None:
    """The active run's overall and stage bars, polled; the whole page reruns once the run has ended."""
    row = next((r for r in store().runs() if r["run_id"] == rid), None)
    if row is None or row["state"] not in ACTIVE:
        st.rerun()
    show_progress(row)


def open_links(row: dict) -> None:
    """Links to the run on the Run page, and to its layers and generations once it has results."""
    params = {"run": row["run_id"]}
    links = st.columns(3)
    links[0].page_link("views/run.py", label="Open on the Run page", icon="🚀", query_params=params)
    if row["state"] == "done":
        links[1].page_link("views/layers.py", label="Per-layer heatmaps", icon="🧱", query_params=params)
        links[2].page_link("views/generations.py", label="Dense vs pruned answers", icon="💬", query_params=params)


def download_results(row: dict) -> None:
    """The run's metrics (CSV, JSON), records (JSONL) and HTML report, of it alone or of its protocol's runs."""
    rid, short = row["run_id"], row["run_id"][:12]
    peers = len(downloads.report_rows(db, rid, same_protocol=True))
    cols = st.columns(5)
    cols[0].download_button("Metrics (.csv)", downloads.metrics_csv(row), f"{short}-metrics.csv", "text/csv",
                            key="dl-csv", icon="📄", on_click="ignore")
    cols[1].download_button("Metrics (.json)", downloads.metrics_json(db, rid), f"{short}-metrics.json",
                            "application/json", key="dl-json", icon="📄", on_click="ignore")
    cols[2].download_button("Records (.jsonl)", deferred(lambda s: downloads.records_jsonl(s, rid), db.root),
                            f"{short}-records.jsonl", "application/jsonl", key="dl-jsonl", icon="📄",
                            on_click="ignore")
    cols[3].download_button("Report of this run (.html)", deferred(lambda s: downloads.report_html(s, rid), db.root),
                            f"{short}-report.html", "text/html", key="dl-html", icon="📊", on_click="ignore")
    cols[4].download_button(f"Report of the {peers} run(s) with its protocol (.html)",
                            deferred(lambda s: downloads.report_html(s, rid, same_protocol=True), db.root),
                            f"{short}-protocol-report.html", "text/html", key="dl-html-protocol", icon="📊",
                            on_click="ignore")


def download_model(row: dict) -> None:
    """The pruned model's folder (its path to copy) and a zip of it built on click; or why it is missing and a
    button that rebuilds it."""
    rid = row["run_id"]
    try:
        folder = downloads.model_folder(db, rid)
    except downloads.ModelMissing as err:
        st.warning(str(err))
        if st.button("Rebuild the pruned model", icon="🔁", key="rebuild"):
            try:
                downloads.rebuild_model(db, rid)
            except StoreError as failed:
                st.error(str(failed))
                return
            st.switch_page("views/run.py", query_params={"run": rid})
        return
    size = cleanup.human_bytes(folder.bytes)
    st.caption(f"The pruned model: {len(folder.files)} files, {size} ({folder.bytes} bytes). Its folder, to copy "
               f"or load with transformers' from_pretrained:")
    st.code(str(folder.path), language=None)
    st.download_button(f"Pruned model (.zip, about {size}; built when you click)",
                       lambda: downloads.model_zip(folder, db.root),
                       f"{downloads.archive_name(rid)}.zip", "application/zip", key="dl-model", icon="📦",
                       on_click="ignore")


def delete_run(row: dict) -> None:
    """Delete the run with a confirmation tick; an active run is refused with the backend's message."""
    rid = row["run_id"]
    st.caption("Deleting removes the run's results, layers, records, jobs and its folder with the pruned model. "
               "It cannot be undone.")
    result = confirmed_delete(rid, "runs-delete")
    if result is None:
        return
    refused = "; ".join(f"{e['path']} {e['reason']}" for e in result["refused"])
    st.session_state["runs-notice"] = (
        f"Deleted run {rid}: {cleanup.human_bytes(result['bytes'])} freed ({result['bytes']} bytes); the store now "
        f"holds {result['after']['runs']} runs." + (f" Not removed: {refused}." if refused else ""))
    st.query_params.pop("run", None)
    st.rerun()


notice = st.session_state.pop("runs-notice", None)
if notice:
    st.success(notice)
try:
    db.recover_stale()
    rows = db.runs()
except StoreError as err:
    st.error(str(err))
    st.stop()
if not rows:
    st.info("No runs in the store yet: start one on the Run page.")
    st.page_link("views/run.py", label="Run", icon="🚀")
    st.stop()

chosen = state_filter(rows)
shown = [r for r in rows if not chosen or r["state"] in chosen]
st.caption(f"{len(shown)} of {len(rows)} runs, newest first · store {md_escape(db.root)}")
if not shown:
    st.warning("No run is in the chosen states: widen the filter.")
    st.stop()
st.dataframe(runs_table(shown), hide_index=True, column_config={
    "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent",
                                                help="fraction of the whole run done, while it is active"),
    "sparsity": st.column_config.NumberColumn(format="%.2f"),
    "message": st.column_config.TextColumn("message", width="large")})
ended = [r for r in shown if r["state"] in ENDED]
if ended:
    with st.expander(f"Why {len(ended)} run(s) did not finish", icon="⚠️"):
        for r in ended:
            st.markdown(f"**{md_escape(label(r))}** · {r['state']} · {when(r['finished_at'])}")
            st.code(r["message"] or "no message", language=None, wrap_lines=True)

st.divider()
row = pick_run(shown, title="Run to open, download or delete")
rid = row["run_id"]
st.subheader(f"Run {rid}")
st.markdown(f"**{row['state']}** · {row['method']} {row['sparsity']:.0%} {row['pattern']} · calibration "
            f"{md_escape(row['calibration'])} · {row['nsamples']} samples x {row['seqlen']} tokens, seed "
            f"{row['seed']} · model {md_escape(row['model'])}")
st.caption(f"Created {when(row['created_at'])} · finished {when(row['finished_at'])} · protocol: "
           f"{md_escape(protocol_label(row['protocol']))}")
if row["state"] in ACTIVE:
    live_progress(rid)
    if st.button("Cancel", icon="⏹️", key="runs-cancel"):
        st.toast(f"run {rid}: {db.cancel(rid) or 'not running'}")
elif row["state"] in ENDED:
    st.error(f"This run {row['state']}; submit it again on the Run page to retry. Its message:")
    st.code(row["message"] or "no message", language=None, wrap_lines=True)
open_links(row)

st.markdown("##### Downloads")
if row["state"] == "done":
    download_results(row)
    download_model(row)
else:
    st.caption("Its metrics, records, report and pruned model can be downloaded once it has finished.")

with st.expander("Delete this run", icon="🗑️"):
    delete_run(row)
