"""Home: what PruneScope shows, the store at a glance (its size too), a one-click demo run, and deleting a run."""

from __future__ import annotations

import streamlit as st

from backend.reports import charts
from backend.runs import cleanup, service
from backend.runs.demo import demo
from backend.runs.protocol import comparable, protocol_label
from backend.runs.spec import DEFAULT_MODEL, SpecError, run_id_of
from views.common import confirmed_delete, data_dir, fmt, label, store

st.title("✂️ PruneScope")
st.markdown(
    "Pruning a language model to 50% sparsity with **SparseGPT** or **Wanda** barely moves its perplexity, yet its "
    "answers get worse. PruneScope shows that gap: prune any Hugging Face causal LM (Magnitude, Wanda, SparseGPT; "
    "unstructured, 2:4, 4:8) with the calibration data of your choice, then compare dense and pruned models by "
    "**perplexity**, **Jensen-Shannon divergence** of their next-token distributions, **task scores** (EM, F1, "
    "ROUGE-1) and an optional **LLM judge**, down to each layer and each generated token."
)


db = store()
rows = db.runs()
frame = charts.frame(rows)
finished = charts.done(frame)
size = cleanup.store_size(db)
cols = st.columns(5)
cols[0].metric("Runs in the store", len(rows))
cols[1].metric("Finished", len(finished))
cols[2].metric("Models", frame["model"].nunique() if len(frame) else 0)
cols[3].metric("Active", sum(r["state"] in ("queued", "running") for r in rows))
cols[4].metric("On disk", cleanup.human_bytes(size["total_bytes"]))
st.caption(f"Store: {db.root} · {size['runs']} runs, {size['total_bytes'] / 1e6:.1f} MB on disk (database "
           f"{cleanup.human_bytes(size['db_bytes'])}; artifacts {cleanup.human_bytes(size['artifact_bytes'])}, "
           f"{size['models']} pruned models)")

measured = [r for r in rows if r["state"] == "done" and r["jsd"] is not None]
if measured:
    same, left_out = comparable(measured)
    best, worst = min(same, key=lambda r: r["jsd"]), max(same, key=lambda r: r["jsd"])
    unit = same[0]["protocol"].get("divergence", {}).get("unit", "nats")
    left, right = st.columns(2)
    left.markdown(f"**Closest to dense** (lowest JS divergence): {label(best)} — JS {fmt(best['jsd'], '.4f')} "
                  f"{unit}, perplexity {fmt(best['dense_ppl'], '.2f')} → {fmt(best['pruned_ppl'], '.2f')}")
    right.markdown(f"**Furthest from dense**: {label(worst)} — JS {fmt(worst['jsd'], '.4f')} {unit}, perplexity "
                   f"{fmt(worst['dense_ppl'], '.2f')} → {fmt(worst['pruned_ppl'], '.2f')}")
    st.caption(f"Among the {len(same)} finished runs measured the same way: {protocol_label(same[0]['protocol'])}."
               + (f" {left_out}" if left_out else ""))

st.subheader("Try it")
status = service.source_status(data_dir())
chosen = demo(status)
spec, ev = chosen.spec, chosen.spec.evaluation
st.write(f"The demo prunes the embedded {DEFAULT_MODEL} with {spec.summary()}, then compares it with the dense model: "
         f"perplexity on {ev.ppl} ({ev.ppl_windows} windows of {ev.ppl_seqlen} tokens), Jensen-Shannon divergence on "
         f"{ev.jsd} and task scores on {ev.tasks} ({ev.limit} examples each). It takes about two minutes on a 2-core "
         "CPU (the first time includes converting the embedded model); a finished demo opens at once.")
st.caption(chosen.reason)
try:
    demo_id = run_id_of(spec, data_dir())
except (SpecError, ValueError) as err:
    demo_id = None
    st.error(str(err))
demo_row = next((r for r in rows if r["run_id"] == demo_id), None)
if demo_row is not None and demo_row["state"] == "done":
    st.success(f"The demo run {demo_id[:8]} is finished: perplexity {fmt(demo_row['dense_ppl'], '.2f')} → "
               f"{fmt(demo_row['pruned_ppl'], '.2f')}, JS divergence {fmt(demo_row['jsd'], '.4f')}, F1 "
               f"{fmt(demo_row['dense_f1'], '.3f')} → {fmt(demo_row['pruned_f1'], '.3f')}.")
    params = {"run": demo_id}
    links = st.columns(4)
    links[0].page_link("views/run.py", label="Its summary", icon="🚀", query_params=params)
    links[1].page_link("views/compare.py", label="Compare", icon="📈")
    links[2].page_link("views/layers.py", label="Its layers", icon="🧱", query_params=params)
    links[3].page_link("views/generations.py", label="Its answers", icon="💬", query_params=params)
elif demo_row is not None and demo_row["state"] in ("queued", "running"):
    st.info(f"The demo run {demo_id[:8]} is {demo_row['state']}.")
    st.page_link("views/run.py", label="Watch its progress", icon="⏳", query_params={"run": demo_id})
elif st.button("Start the demo", type="primary", icon="▶️"):
    try:
        submitted = service.submit(db, spec, data_dir())
    except (SpecError, ValueError) as err:
        st.error(str(err))
    else:
        st.session_state["cached"] = submitted["run_id"] if submitted["cached"] else None
        st.switch_page("views/run.py", query_params={"run": submitted["run_id"]})
st.page_link("views/run.py", label="Or choose your own model, method and data", icon="🚀")


def manage_store(rows: list[dict]) -> None:
    """Delete one run (with a confirmation tick), report the bytes freed, and name the CLI's gc."""
    notice = st.session_state.pop("store-notice", None)
    if notice:
        st.success(notice)
    st.caption("Deleting a run removes its rows (results, layers, examples, jobs) and its folder with the pruned "
               "model. To free space but keep every run's results, drop old pruned models from the command line: "
               "`python -m backend gc --keep-models 5` (add `--dry-run` to see what would go).")
    if not rows:
        st.caption("No runs to delete.")
        return
    by_id = {r["run_id"]: r for r in rows}
    chosen = st.selectbox("Run to delete", list(by_id), key="delete-run",
                          format_func=lambda rid: f"{label(by_id[rid])} · {by_id[rid]['state']}")
    result = confirmed_delete(chosen, "delete")
    if result is None:
        return
    refused = "; ".join(f"{e['path']} {e['reason']}" for e in result["refused"])
    files = sum(e["bytes"] for e in result["removed"] if e.get("path"))
    st.session_state["store-notice"] = (
        f"Deleted run {chosen}: {cleanup.human_bytes(result['bytes'])} freed ({result['bytes']} bytes: its folder "
        f"{cleanup.human_bytes(files)}, its database rows {cleanup.human_bytes(result['bytes'] - files)}, reused by "
        f"the database and returned to the disk by `gc`); the store now holds {result['after']['runs']} runs, "
        f"{cleanup.human_bytes(result['after']['total_bytes'])} on disk."
        + (f" Not removed: {refused}." if refused else ""))
    st.rerun()


with st.expander("Manage the store", icon="🗄️", expanded="store-notice" in st.session_state):
    manage_store(rows)
