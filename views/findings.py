"""Findings: the three claims of arXiv 2409.11233 tested on the store's runs, each with its verdict, the one-sentence
rule that gives it, the numbers and intervals behind it, the runs it used, and a button that queues exactly the runs
missing to decide. The choices live in the URL."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from backend.findings.claims import CLOSE_PPL, HELD, NOT_HELD
from backend.findings.evidence import cohort_label, cohorts
from backend.findings.service import build, queue
from backend.reports import charts
from backend.runs.spec import SpecError
from backend.runs.store import ACTIVE, Store, StoreError
from views.common import data_dir, md_escape, store, url_select

ALERT = {HELD: st.success, NOT_HELD: st.error}
TASK_SCORES = ["f1", "em", "rouge1", "judge"]

st.title("🔎 Findings")
st.caption("Do the paper's three claims hold on your runs? Each verdict follows the rule written under it, from "
           "95% bootstrap intervals: a verdict is 'held' or 'not held' only when the intervals clear the rule's "
           "threshold, else 'inconclusive'.")


@st.cache_data(show_spinner="Testing the claims (bootstrap intervals) ...", max_entries=16)
def findings_of(root: str, signature: tuple, cohort: str | None, task: str, close: float) -> dict:
    """The findings of a store's cohort, cached while its finished runs (`signature`) stay the same."""
    return build(Store(root), cohort=cohort, task=task, close=close).to_dict()


def numbers_table(claim: dict) -> pd.DataFrame:
    return pd.DataFrame([{"part": part["name"], "verdict": part["verdict"] + ("" if part["counted"] else
                                                                              " (not counted)"),
                          "figure": number["label"], "value": number["value"],
                          "95% interval": charts.interval_text(number["interval"]),
                          "runs": ", ".join(r[:8] for r in number["runs"])}
                         for part in claim["parts"] for number in (part["numbers"] or [
                             {"label": part["why"], "value": None, "interval": None, "runs": []}])])


def show_claim(claim: dict, task: str) -> None:
    st.subheader(f"Claim {claim['claim']}")
    st.markdown(f"> {md_escape(claim['statement'])}")
    ALERT.get(claim["verdict"], st.warning)(f"Verdict: {claim['verdict']}")
    st.markdown(f"**Rule.** {md_escape(claim['rule'])}")
    for part in claim["parts"]:
        st.markdown(f"- **{md_escape(part['name'])}**: {part['verdict']} — {md_escape(part['why'])}"
                    + ("" if part["counted"] else " *(reported, not counted)*"))
    st.dataframe(numbers_table(claim), hide_index=True, width="stretch", key=f"claim-{claim['claim']}",
                 placeholder=charts.MISSING, column_config={"value": st.column_config.NumberColumn(format="%.4g")})
    if "predictors" in claim:
        table = pd.DataFrame(claim["predictors"]["table"])
        st.markdown(md_escape(claim["predictors"]["sentence"]))
        if table[["spearman", "kendall"]].notna().any().any():
            st.plotly_chart(charts.predictors_chart(table, task), key=f"predictors-{claim['claim']}")
    for need in claim["needs"]:
        st.caption(f"To decide: {need}")
    if claim["missing"]:
        st.caption("Missing runs: " + "; ".join(f"{m['method']} {m['sparsity']:.0%} {m['pattern']} "
                                                f"{m['calibration']}" for m in claim["missing"]))
    ids = list(dict.fromkeys(claim["runs"]))
    if ids:
        links = st.columns(min(len(ids), 6))
        for i, rid in enumerate(ids[:6]):
            links[i].page_link("views/generations.py", label=rid[:8], icon="💬", query_params={"run": rid})


try:
    db = store()
    rows = db.runs()
except StoreError as err:
    st.error(str(err))
    st.stop()
found_cohorts = cohorts(rows)
left, middle, right = st.columns([3, 1, 1])
with left:
    key = None
    if found_cohorts:
        labels = {k: f"{cohort_label(g[0])} · {len(g)} run(s)" for k, g in found_cohorts}
        key = url_select("Cohort (one model, calibration recipe and protocol)", [k for k, _ in found_cohorts],
                         "cohort", labels)
with middle:
    options = [*TASK_SCORES, *charts.lm_scores(charts.frame(rows))] if rows else TASK_SCORES
    task = url_select("Task score", options, "task", {t: charts.score_label(t) for t in options}, default="f1")
with right:
    close = st.number_input("Claim 1: 'close' perplexity ratio", min_value=1.01, value=CLOSE_PPL, step=0.1,
                            key="close", help="a pruned / dense perplexity ratio whose interval lies below this is "
                                              "close to dense")
signature = tuple((r["run_id"], r.get("finished_at")) for r in rows if r["state"] == "done")
result = findings_of(str(db.root), signature, key, task, float(close))
if result["cohort"]:
    st.markdown(f"**Runs of cohort** `{result['cohort_key']}`: {md_escape(result['cohort'])}")
else:
    st.info("No finished runs yet: every claim is inconclusive, and the missing runs below are the whole quick "
            "study.")
boot = result["bootstrap"]
st.caption(f"Intervals: {boot['confidence']:.0%} {boot['method']} bootstrap, {boot['resamples']} resamples, seed "
           f"{boot['seed']}, over each metric's units (perplexity: windows; divergence: samples; task scores: "
           f"examples); differences paired over the same units.")
for left_out in result["left_out"]:
    st.caption(f"Left out: {left_out['run_id'][:8]}: {left_out['why']}")

for claim in result["claims"]:
    show_claim(claim, task)

st.subheader("What is missing")
active = [r for r in rows if r["state"] in ACTIVE]
if active:
    st.info(f"{len(active)} run(s) are queued or running; their verdicts come in as they finish.")
    st.page_link("views/runs.py", label="Runs", icon="🗂️")
missing = result["missing"]
if not missing:
    st.success("Every run the claims need is in this cohort; an inconclusive verdict now needs more examples, "
               "windows or runs (see each claim).")
else:
    st.markdown("\n".join(f"- {md_escape(m['label'])}" for m in missing))
    command = "python -m backend findings --queue" + (f" --cohort {result['cohort_key']}" if result["cohort_key"]
                                                      else "")
    st.caption(f"From the command line: `{command}`")
    if st.button(f"Queue the {len(missing)} missing run(s)", icon="🚀", key="queue-missing"):
        try:
            queued = queue(db, build(db, cohort=key, task=task, close=float(close)), data_dir())
        except (SpecError, StoreError, ValueError, FileNotFoundError) as err:
            st.error(f"Nothing was queued: {err}")
        else:
            st.success(f"Queued {sum(not q['cached'] for q in queued)} run(s); "
                       f"{sum(q['cached'] for q in queued)} were already in the store. Watch them on the Runs page.")
            st.page_link("views/runs.py", label="Runs", icon="🗂️")
