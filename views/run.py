"""Run: a form for one experiment, submitted to the worker; the run's progress is polled without blocking. The form
shows the watched run's settings and a chosen data folder's sources, and refuses what the backend's early checks
find wrong before anything is queued."""

from __future__ import annotations

import streamlit as st

from backend.reports.charts import interval_text, score_label
from backend.runs import service
from backend.runs.checks import data_dir_sources
from backend.runs.progress import self_calibration_seconds
from backend.runs.protocol import metric_note
from backend.runs.spec import (
    ALLOCATIONS,
    DEFAULT_MODEL,
    METHODS,
    EvalSettings,
    RunSpec,
    SpecError,
    Targets,
    layer_sparsity_text,
    parse_layer_sparsity,
)
from backend.runs.store import StoreError
from backend.runs.uncertainty import ROW_INTERVALS
from backend.sources.lm_tasks import SHIPPED_TASK
from views.common import data_dir, fmt, store
from views.progress import show_progress

EXECUTORS = ("local", "ray")

PATTERNS = ("unstructured", "2:4", "4:8")
NONE = "(skip)"
STATUS_WORDS = {"offline": "", "hub": " (downloads from the hub)", "unavailable": " (not available offline)"}
RETRYABLE = ("interrupted", "cancelled")
TEXTS, RECORDS = service.sources_of_kind("texts"), service.sources_of_kind("records")
# each source picker's key and the named sources it offers
PICKERS: dict[str, list[str]] = {"calibration": [*TEXTS, *RECORDS, "self"], "ppl": TEXTS, "jsd": RECORDS,
                                 "tasks": RECORDS}
# what a fresh form shows; its sources are the paper's sets, which a data folder holding them moves the pickers to
FORM_DEFAULT = RunSpec(method="wanda", sparsity=0.5, nsamples=32, seqlen=256,
                       evaluation=EvalSettings(ppl_windows=10, limit=50))
JUDGE_DEFAULT = "gpt-4o-mini"
TASK_SHOTS = "each task's own"
SHOTS = (TASK_SHOTS, 0, 1, 2, 3, 5, 10, 25)

st.title("🚀 Run")
db = store()


def values_of(spec: RunSpec) -> dict:
    """The form's widget values (by key) that show a spec."""
    ev = spec.evaluation
    named = spec.calibration in PICKERS["calibration"]
    values = {"model": spec.model, "method": spec.method, "pattern": spec.pattern, "sparsity": float(spec.sparsity),
              "calibration_file": "" if named else spec.calibration, "nsamples": spec.nsamples,
              "seqlen": spec.seqlen, "seed": spec.seed, "ppl": ev.ppl or NONE, "jsd": ev.jsd or NONE,
              "tasks": ev.tasks or NONE, "limit": ev.limit, "ppl_windows": ev.ppl_windows,
              "ppl_seqlen": ev.ppl_seqlen, "max_new_tokens": ev.max_new_tokens, "jsd_limit": ev.jsd_limit or 0,
              "judge_url": ev.judge_base_url or "", "allocation": spec.targets.allocation,
              "owl_m": float(spec.targets.owl_m), "owl_lambda": float(spec.targets.owl_lambda),
              "include": " ".join(spec.targets.include), "exclude": " ".join(spec.targets.exclude),
              "layer_sparsity": layer_sparsity_text(spec.targets), "lm_eval": ",".join(ev.lm_eval),
              "lm_eval_limit": ev.lm_eval_limit or 0,
              "lm_eval_fewshot": TASK_SHOTS if ev.lm_eval_fewshot is None else ev.lm_eval_fewshot,
              "lm_eval_include": ev.lm_eval_include or ""}
    if named:
        values["calibration"] = spec.calibration
    if ev.judge_model:
        values["judge_model"] = ev.judge_model
    return values


def show_watched(rid: str | None) -> None:
    """Put the watched run's settings (and data folder) into the form when the watched run changes, or when the
    page's widgets were reset by a visit to another page; what the user edits afterwards stays."""
    if not rid or (st.session_state.get("shown_run") == rid and "model" in st.session_state):
        return
    st.session_state["shown_run"] = rid
    try:
        spec, job = db.spec(rid), db.latest_job(rid)
    except (StoreError, SpecError):
        return
    st.session_state.update(values_of(spec), use_judge=bool(spec.evaluation.judge_model))
    if job and job.get("data_dir"):
        st.session_state["data_dir"] = job["data_dir"]
    st.session_state["sources_of"] = st.session_state.get("data_dir", "")


def start_values(status: dict[str, str]) -> None:
    """A fresh form: FORM_DEFAULT, each picker on its default source when that loads now, else the first that does."""
    values = {"judge_model": JUDGE_DEFAULT, **values_of(FORM_DEFAULT), "use_judge": False,
              "data_dir": data_dir() or ""}
    for key, names in PICKERS.items():
        usable = [n for n in names if status.get(n, "offline") != "unavailable"]
        if values[key] not in usable:
            values[key] = usable[0] if usable else values[key]
    for key, value in values.items():
        st.session_state.setdefault(key, value)
    st.session_state.setdefault("sources_of", values["data_dir"])


def data_folder() -> None:
    """The data folder field: says what a folder holds (or why it is no data folder), and when it changes moves
    each picker to the folder's source for it (its default set first), so the built-in demo data is never kept
    silently."""
    with st.expander("Data folder", expanded=False):
        st.text_input("Folder with local data files (laid out like ../shared/data)", key="data_dir",
                      help="Named sources are read from here, else from the hub.")
    folder = st.session_state.get("data_dir", "").strip()
    if not folder:
        return
    try:
        found = data_dir_sources(folder)
    except SpecError as err:
        st.error(str(err))
        return
    st.caption(f"Data folder {folder} holds {', '.join(found)}.")
    if st.session_state.get("sources_of") == folder:
        return
    st.session_state["sources_of"] = folder
    default = values_of(FORM_DEFAULT)
    for key, names in PICKERS.items():
        here = [n for n in names if n in found]
        if here:
            st.session_state[key] = default[key] if default[key] in here else here[0]


def source_choice(label: str, key: str, status: dict[str, str], allow_skip: bool) -> str | None:
    """A selectbox of named sources that says which cannot load now, instead of failing in the worker later."""
    options = ([NONE] if allow_skip else []) + PICKERS[key]
    choice = st.selectbox(label, options, key=key, format_func=lambda n: n + (
        self_words() if n == "self" else STATUS_WORDS.get(status.get(n, "offline"), "")))
    return None if choice == NONE else choice


def self_words() -> str:
    """How long the model takes to write its own calibration text for the form's samples and length."""
    nsamples, seqlen = int(st.session_state.get("nsamples") or 1), int(st.session_state.get("seqlen") or 1)
    return (f" (the model writes {nsamples} x {seqlen} tokens itself: about "
            f"{self_calibration_seconds(nsamples, seqlen):.0f} s on a 2-core CPU for the embedded model)")


def form(status: dict[str, str]) -> RunSpec | None:
    """The experiment form; returns a spec when submitted."""
    state = st.session_state
    patterns = list(dict.fromkeys([*PATTERNS, state["pattern"]]))
    with st.form("run"):
        left, right = st.columns(2)
        with left:
            st.subheader("Pruning")
            model = st.text_input("Model", key="model",
                                  help=f"{DEFAULT_MODEL} (embedded), a Hugging Face id such as "
                                       "meta-llama/Llama-2-7b-hf, or a local folder")
            method = st.selectbox("Method", METHODS, key="method")
            pattern = st.selectbox("Pattern", patterns, key="pattern")
            sparsity = st.slider("Sparsity (N:M patterns use N/M)", 0.0, 0.99, step=0.01, key="sparsity")
            calibration = source_choice("Calibration data", "calibration", {**status, "self": "offline"}, False)
            calibration_file = st.text_input("... or a local calibration file (.jsonl/.json/.txt/.parquet/.pt)",
                                             key="calibration_file")
            a, b, c = st.columns(3)
            nsamples = a.number_input("Samples", min_value=1, key="nsamples")
            seqlen = b.number_input("Sequence length", min_value=2, key="seqlen")
            seed = c.number_input("Seed", min_value=0, key="seed")
            with st.expander("Which matrices, and how much each (OWL, per layer)"):
                allocation = st.selectbox("Allocation", ALLOCATIONS, key="allocation",
                                          help="uniform: every matrix at the sparsity. owl: outlier-weighted layerwise "
                                               "sparsity, layers with more outliers pruned less, the mean kept at the "
                                               "sparsity (unstructured only)")
                a, b = st.columns(2)
                owl_m = a.number_input("OWL M", min_value=0.1, step=0.5, key="owl_m",
                                       help="a score is an outlier above M x its layer's mean")
                owl_lambda = b.number_input("OWL lambda", min_value=0.01, max_value=0.49, step=0.01, key="owl_lambda",
                                            help="each layer's sparsity stays within sparsity +/- lambda")
                include = st.text_input("Only these matrices (fnmatch patterns, space-separated)", key="include",
                                        help="full names such as model.layers.0.* or *.mlp.down_proj, or names inside "
                                             "a layer such as mlp.*; empty: all")
                exclude = st.text_input("Keep these dense (fnmatch patterns, space-separated)", key="exclude")
                layer_sparsity = st.text_input("Per-layer sparsities", key="layer_sparsity",
                                               help="one per decoder layer (0.3,0.4,...), or a JSON object of "
                                                    '{"full-name pattern": sparsity} inline or in a .json file; '
                                                    "matrices no pattern names get the sparsity above")
        with right:
            st.subheader("Evaluation")
            ppl = source_choice("Perplexity data", "ppl", status, True)
            jsd = source_choice("JS divergence data (teacher forcing)", "jsd", status, True)
            tasks = source_choice("Task data (generated answers)", "tasks", status, True)
            a, b, c = st.columns(3)
            limit = a.number_input("Examples", min_value=1, key="limit")
            ppl_windows = b.number_input("Perplexity windows", min_value=1, key="ppl_windows")
            ppl_seqlen = c.number_input("Perplexity length", min_value=2, key="ppl_seqlen")
            a, b = st.columns(2)
            max_new_tokens = a.number_input("Max new tokens", min_value=1, key="max_new_tokens")
            jsd_limit = b.number_input("JS records (0: as many as Examples)", min_value=0, key="jsd_limit")
            use_judge = st.toggle("LLM judge (OpenAI-compatible; key from OPENAI_API_KEY)", key="use_judge")
            judge_model = st.text_input("Judge model", key="judge_model")
            judge_url = st.text_input("Judge endpoint (empty: $OPENAI_BASE_URL or OpenAI)", key="judge_url")
            st.text_input("Its API key, only for another endpoint (kept in this dashboard's memory for the run, "
                          "never written)", type="password", key="judge_key")
            with st.expander("lm-evaluation-harness tasks"):
                harness = st.text_input("Tasks (comma-separated; empty: none)", key="lm_eval",
                                        help=f"{SHIPPED_TASK} ships with PruneScope and runs offline; lm-eval's own "
                                             "tasks (arc_easy, boolq, hellaswag, ...) read their data from the hub")
                a, b = st.columns(2)
                harness_limit = a.number_input("Documents per task (0: all)", min_value=0, key="lm_eval_limit")
                shots = b.selectbox("Shots", SHOTS, key="lm_eval_fewshot")
                harness_include = st.text_input("Folder of local task YAMLs (optional)", key="lm_eval_include",
                                                help="dataset_path: json with dataset_kwargs.data_files; a relative "
                                                     "file is read from this folder")
        cluster = service.cluster_address()
        if cluster:
            st.radio("Where its jobs run", EXECUTORS, key="executor", horizontal=True,
                     format_func=lambda e: "this machine" if e == "local" else f"the Ray cluster at {cluster}",
                     help="A worker already serving this store keeps its executor until it has been idle a minute")
        submitted = st.form_submit_button("Prune and evaluate", type="primary")
    if not submitted:
        return None
    if use_judge and judge_url.strip() and not service.judge_endpoint_is_configured(judge_url) \
            and not st.session_state.get("judge_key", "").strip():
        st.error(f"The server's API key is only ever sent to its configured judge endpoint "
                 f"({service.configured_judge_endpoint()}), not to {judge_url.strip()}: type that endpoint's own key, "
                 f"or leave the endpoint empty.")
        return None
    if pattern != "unstructured":
        n, m = pattern.split(":")
        sparsity = int(n) / int(m)
    try:
        layers, named = parse_layer_sparsity(layer_sparsity)
    except ValueError as err:
        st.error(str(err))
        return None
    targets = Targets(include=tuple(include.split()), exclude=tuple(exclude.split()), allocation=allocation,
                      owl_m=float(owl_m), owl_lambda=float(owl_lambda), layers=layers, patterns=named)
    evaluation = EvalSettings(ppl=ppl, ppl_seqlen=int(ppl_seqlen), ppl_windows=int(ppl_windows), jsd=jsd,
                              tasks=tasks, limit=int(limit), max_new_tokens=int(max_new_tokens),
                              jsd_limit=int(jsd_limit) or None,
                              judge_model=judge_model.strip() if use_judge else None,
                              judge_base_url=(judge_url.strip() or None) if use_judge else None,
                              lm_eval=tuple(t.strip() for t in harness.split(",") if t.strip()),
                              lm_eval_limit=int(harness_limit) or None,
                              lm_eval_fewshot=None if shots == TASK_SHOTS else int(shots),
                              lm_eval_include=harness_include.strip() or None)
    return RunSpec(method=method, sparsity=sparsity, model=model.strip(), pattern=pattern,
                   calibration=calibration_file.strip() or calibration, nsamples=int(nsamples), seqlen=int(seqlen),
                   seed=int(seed), evaluation=evaluation, targets=targets)


def ended_text(row: dict) -> str:
    """Why a run stopped and what to do: only an interrupted or cancelled run is worth submitting again as it is."""
    said = f"{row['state']}: {row['message'] or 'no message'}."
    if row["state"] in RETRYABLE:
        return said + " Submit the same settings again to retry."
    if row["state"] == "failed":
        return said + (" The same settings would fail the same way: change what the message names in the form "
                       "above (it shows this run's settings), then submit.")
    return said


def interval_help(row: dict, metric: str, change: str | None = None) -> str:
    """A summary metric's unit and protocol, its 95% interval and, for a change vs dense, the paired one."""
    bounds = row.get("intervals") or {}
    said = [metric_note(metric, row.get("protocol") or {})]
    for key, what in ((ROW_INTERVALS.get(metric), "95% interval"), (change, "change vs dense, paired 95% interval")):
        if key and bounds.get(key):
            said.append(f"{what} {interval_text(bounds[key], '.4g')}")
    return "\n\n".join(said)


def harness_help(row: dict, key: str) -> str:
    """An lm-eval score's protocol, both sides with lm-eval's stderr, and the change's paired interval."""
    bounds = (row.get("intervals") or {}).get(f"delta.{key}")
    sides = ", ".join(f"{side} {fmt(row.get(f'{side}_{key}'), '.4f')} ± {fmt(row.get(f'{side}_{key}_stderr'), '.4f')}"
                      for side in ("dense", "pruned"))
    return "\n\n".join([metric_note(f"pruned_{key}", row.get("protocol") or {}), f"{sides} (± lm-eval's stderr)",
                         *([f"change vs dense, paired 95% interval over documents {interval_text(bounds, '.4g')}"]
                           if bounds else [])])


def show_summary(detail: dict) -> None:
    summary, row = detail["summary"], detail["row"]
    cols = st.columns(5)
    cols[0].metric("Perplexity", fmt(row["pruned_ppl"], ".2f"), delta=None if row["dense_ppl"] is None else
                   f"{row['pruned_ppl'] - row['dense_ppl']:+.2f} vs dense", delta_color="inverse",
                   help=interval_help(row, "pruned_ppl", "delta.ppl"))
    cols[1].metric("JS divergence", fmt(row["jsd"], ".4f"), help=interval_help(row, "jsd"))
    cols[2].metric("Top-1 flip rate", fmt(row["flip_rate"], ".3f"), help=interval_help(row, "flip_rate"))
    cols[3].metric("F1", fmt(row["pruned_f1"]), delta=None if row["dense_f1"] is None else
                   f"{row['pruned_f1'] - row['dense_f1']:+.3f} vs dense",
                   help=interval_help(row, "pruned_f1", "delta.f1"))
    cols[4].metric("Measured sparsity", fmt(row["overall_sparsity"], ".3f"))
    harness = row.get("lm_eval") or []
    for start in range(0, len(harness), 4):
        for col, key in zip(st.columns(4), harness[start:start + 4]):
            dense, pruned = row.get(f"dense_{key}"), row.get(f"pruned_{key}")
            col.metric(score_label(key), fmt(pruned, ".4f"),
                       delta=None if dense is None or pruned is None else f"{pruned - dense:+.4f} vs dense",
                       help=harness_help(row, key))
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
        show_progress(row)
        if st.button("Cancel", key="cancel"):
            st.toast(f"run {rid}: {store().cancel(rid) or 'not running'}")
    elif row["state"] == "done":
        st.success(f"Done{' (served from the store)' if st.session_state.get('cached') == rid else ''}.")
        show_summary(detail)
    else:
        st.error(ended_text(row))
        if detail["summary"]:
            show_summary(detail)


show_watched(st.query_params.get("run"))
status = service.source_status(data_dir())
start_values(status)
data_folder()
spec = form(status)
if spec is not None:
    try:
        submitted = service.submit(db, spec, data_dir(), judge_key=st.session_state.get("judge_key") or None,
                                   executor=st.session_state.get("executor") if service.cluster_address() else None)
    except (SpecError, ValueError) as err:
        st.error(str(err))
    else:
        st.query_params["run"] = submitted["run_id"]
        st.session_state["cached"] = submitted["run_id"] if submitted["cached"] else None
rid = st.query_params.get("run")
if rid:
    watch(rid)
