"""Run: a form for one experiment, submitted to the worker; the run's progress is polled without blocking."""

from __future__ import annotations

import time

import streamlit as st

from backend.runs import service
from backend.runs.spec import DEFAULT_MODEL, METHODS, EvalSettings, RunSpec, SpecError
from views.common import data_dir, fmt, store

PATTERNS = ("unstructured", "2:4", "4:8")
NONE = "(skip)"
STATUS_WORDS = {"offline": "", "hub": " (downloads from the hub)", "unavailable": " (not available offline)"}

st.title("🚀 Run")
db = store()


def source_choice(label: str, names: list[str], default: str, status: dict[str, str], allow_skip: bool,
                  key: str) -> str | None:
    """A selectbox of named sources that says which cannot load now, instead of failing in the worker later."""
    options = ([NONE] if allow_skip else []) + names
    usable = [n for n in names if status.get(n, "offline") != "unavailable"]
    start = default if default in usable else (usable[0] if usable else options[0])
    choice = st.selectbox(label, options, index=options.index(start), key=key,
                          format_func=lambda n: n + STATUS_WORDS.get(status.get(n, "offline"), ""))
    return None if choice == NONE else choice


def form() -> RunSpec | None:
    """The experiment form; returns a spec when submitted."""
    with st.expander("Data folder", expanded=False):
        st.text_input("Folder with local data files (the names of ../shared/data)", key="data_dir",
                      value=data_dir() or "", help="Named sources are read from here, else from the hub.")
    status = service.source_status(data_dir())
    texts, records = service.sources_of_kind("texts"), service.sources_of_kind("records")
    with st.form("run"):
        left, right = st.columns(2)
        with left:
            st.subheader("Pruning")
            model = st.text_input("Model", value=DEFAULT_MODEL,
                                  help=f"{DEFAULT_MODEL} (embedded), a Hugging Face id such as "
                                       "meta-llama/Llama-2-7b-hf, or a local folder")
            method = st.selectbox("Method", METHODS, index=METHODS.index("wanda"))
            pattern = st.selectbox("Pattern", PATTERNS)
            sparsity = st.slider("Sparsity (N:M patterns use N/M)", 0.05, 0.95, 0.5, 0.05)
            calibration = source_choice("Calibration data", [*texts, *records, "self"], "c4",
                                        {**status, "self": "offline"}, False, "calibration")
            calibration_file = st.text_input("... or a local calibration file (.jsonl/.json/.txt/.parquet/.pt)")
            a, b, c = st.columns(3)
            nsamples = a.number_input("Samples", 1, 4096, 32)
            seqlen = b.number_input("Sequence length", 8, 32768, 256)
            seed = c.number_input("Seed", 0, 2**31 - 1, 0)
        with right:
            st.subheader("Evaluation")
            ppl = source_choice("Perplexity data", texts, "wikitext2", status, True, "ppl")
            jsd = source_choice("JS divergence data (teacher forcing)", records, "alpaca", status, True, "jsd")
            tasks = source_choice("Task data (generated answers)", records, "unnatural", status, True, "tasks")
            a, b, c = st.columns(3)
            limit = a.number_input("Examples", 1, 100000, 50)
            ppl_windows = b.number_input("Perplexity windows", 1, 100000, 10)
            ppl_seqlen = c.number_input("Perplexity length", 8, 32768, 512)
            max_new_tokens = st.number_input("Max new tokens", 1, 2048, 32)
            use_judge = st.toggle("LLM judge (OpenAI-compatible; key from OPENAI_API_KEY)")
            judge_model = st.text_input("Judge model", value="gpt-4o-mini")
            judge_url = st.text_input("Judge endpoint (empty: $OPENAI_BASE_URL or OpenAI)")
            st.text_input("Its API key, only for another endpoint (kept in this dashboard's memory for the run, "
                          "never written)", type="password", key="judge_key")
        submitted = st.form_submit_button("Prune and evaluate", type="primary")
    if not submitted:
        return None
    if use_judge and judge_url.strip() and not service.judge_endpoint_is_configured(judge_url) \
            and not st.session_state.get("judge_key", "").strip():
        st.error(f"The server's API key is only ever sent to its configured judge endpoint "
                 f"({service.configured_judge_endpoint()}), not to {judge_url.strip()}: type that endpoint's own key, "
                 f"or leave the endpoint empty.")
        return None
    evaluation = EvalSettings(ppl=ppl, ppl_seqlen=int(ppl_seqlen), ppl_windows=int(ppl_windows), jsd=jsd,
                              tasks=tasks, limit=int(limit), max_new_tokens=int(max_new_tokens),
                              judge_model=judge_model.strip() if use_judge else None,
                              judge_base_url=(judge_url.strip() or None) if use_judge else None)
    return RunSpec(method=method, sparsity=2 / 4 if pattern == "2:4" else 4 / 8 if pattern == "4:8" else sparsity,
                   model=model.strip(), pattern=pattern, calibration=calibration_file.strip() or calibration,
                   nsamples=int(nsamples), seqlen=int(seqlen), seed=int(seed), evaluation=evaluation)


def eta(row: dict) -> str:
    """Elapsed time, and the current stage's remaining time from its pace so far."""
    now = time.time()
    text = f"elapsed {now - (row['started_at'] or now):.0f} s"
    done, total, began = row["done"], row["total"], row["stage_started_at"]
    if done and total and began and done < total:
        text += f" · about {(now - began) / done * (total - done):.0f} s left in {row['stage']}"
    return text


def show_summary(detail: dict) -> None:
    summary, row = detail["summary"], detail["row"]
    cols = st.columns(5)
    cols[0].metric("Perplexity", fmt(row["pruned_ppl"], ".2f"), delta=None if row["dense_ppl"] is None else
                   f"{row['pruned_ppl'] - row['dense_ppl']:+.2f} vs dense", delta_color="inverse")
    cols[1].metric("JS divergence", fmt(row["jsd"], ".4f"))
    cols[2].metric("Top-1 flip rate", fmt(row["flip_rate"], ".3f"))
    cols[3].metric("F1", fmt(row["pruned_f1"]), delta=None if row["dense_f1"] is None else
                   f"{row['pruned_f1'] - row['dense_f1']:+.3f} vs dense")
    cols[4].metric("Measured sparsity", fmt(row["overall_sparsity"], ".3f"))
    if summary and "flips_lost" in summary:
        st.caption(f"Answers right under dense and wrong pruned: {summary['flips_lost']}; the reverse: "
                   f"{summary['flips_gained']}.")
    origin = row.get("provenance") or {}
    if origin:
        st.caption(f"Provenance: {origin.get('device_type')} · {origin.get('dtype')} · PruneScope {origin.get('code')} · "
                   f"torch {origin.get('torch')} · transformers {origin.get('transformers')}"
                   + (" · **made by other code than this dashboard's**" if row.get("other_code") else ""))
    links = st.columns(3)
    params = {"run": row["run_id"]}
    links[0].page_link("views/compare.py", label="Compare with other runs", icon="📈")
    links[1].page_link("views/layers.py", label="Per-layer heatmaps", icon="🧱", query_params=params)
    links[2].page_link("views/generations.py", label="Dense vs pruned answers", icon="💬", query_params=params)


@st.fragment(run_every=1.0)
def watch(rid: str) -> None:
    """The run's state, polled every second while it is active."""
    try:
        detail = service.run_detail(store(), rid)
    except SpecError as err:
        st.error(str(err))
        return
    row = detail["row"]
    st.subheader(f"Run {rid}")
    st.caption(detail["spec"].summary() + f" · {detail['spec'].model}")
    if detail["active"]:
        total, done = row["total"] or 0, row["done"] or 0
        st.progress(done / total if total else 0.0, text=f"{row['state']}: {row['stage'] or 'waiting for the worker'}"
                    + (f" {done}/{total}" if total else "") + (f" · {row['message']}" if row["message"] else ""))
        st.caption(eta(row) if row["started_at"] else "queued")
        if st.button("Cancel", key="cancel"):
            st.toast(f"run {rid}: {store().cancel(rid) or 'not running'}")
    elif row["state"] == "done":
        st.success(f"Done{' (served from the store)' if st.session_state.get('cached') == rid else ''}.")
        show_summary(detail)
    else:
        st.error(f"{row['state']}: {row['message'] or 'no message'}. Submit the same settings again to retry.")
        if detail["summary"]:
            show_summary(detail)


spec = form()
if spec is not None:
    try:
        submitted = service.submit(db, spec, data_dir(), judge_key=st.session_state.get("judge_key") or None)
    except (SpecError, ValueError) as err:
        st.error(str(err))
    else:
        st.query_params["run"] = submitted["run_id"]
        st.session_state["cached"] = submitted["run_id"] if submitted["cached"] else None
rid = st.query_params.get("run")
if rid:
    watch(rid)
