"""Generations: a run's task answers, dense beside pruned, the pruned answer coloured token by token by how far the
two models' next-token distributions diverge there; and the divergence examples coloured the same way."""

from __future__ import annotations

import streamlit as st

from backend.runs.protocol import metric_note
from views.common import (
    FLIPS,
    by_divergence,
    filter_flips,
    finished_runs_or_stop,
    fmt,
    jsd_legend,
    jsd_unit,
    pick_run,
    store,
    token_html,
    visible_tokens,
)

st.title("💬 Generations")


def scores_line(example: dict, side: str) -> str:
    """EM / F1 / ROUGE-1 of one side (and the judge's mean score when it judged this example)."""
    scores = example.get(side) if isinstance(example.get(side), dict) else {}
    values = {m: scores.get(m, example.get(f"{m}_{side}")) for m in ("em", "f1", "rouge1")}
    line = f"EM {fmt(values['em'], '.0f')} · F1 {fmt(values['f1'])} · ROUGE-1 {fmt(values['rouge1'])}"
    judged = example.get(f"judge_{side}")
    if isinstance(judged, dict) and judged.get("mean") is not None:
        line += f" · judge {fmt(judged['mean'], '.1f')}"
    elif isinstance(judged, dict) and judged.get("error"):
        line += " · judge failed"
    return line


def coloured(tokens, values, special, unit: str, fallback: str | None) -> None:
    """Tokens coloured by JSD, without the special ones (the record's marks), or the plain text and a caption when
    the record has no per-token values."""
    if isinstance(tokens, list) and isinstance(values, list) and tokens:
        if len(values) != len(tokens):
            st.caption(f"{len(tokens)} tokens but {len(values)} divergence values: the rest are left uncoloured.")
        shown, shown_values, _hidden = visible_tokens(tokens, values, special)
        if "".join(shown).strip():
            st.html(token_html(shown, shown_values, unit))
        else:
            st.caption("(empty answer)")  # as the dense side says of its answer stripped of whitespace
    else:
        if fallback:
            st.text(fallback)
        st.caption("No per-token divergence recorded for this example (an older run).")


def task_example(example: dict, unit: str) -> None:
    with st.container(border=True):
        st.markdown(f"**{example.get('id', '?')}** · answer JSD {fmt(example.get('answer_jsd'), '.4f')} {unit}")
        prompt = "\n\n".join(p for p in (example.get("instruction"), example.get("input")) if p)
        st.caption("Prompt")
        st.text(prompt or "–")
        st.caption("Reference")
        st.text(example.get("reference") or "–")
        dense, pruned = st.columns(2)
        with dense:
            st.markdown("**Dense**")
            st.caption(scores_line(example, "dense"))
            if example.get("output_dense"):
                st.text(example["output_dense"])
            else:
                st.caption("(empty answer)")
        with pruned:
            st.markdown("**Pruned**")
            st.caption(scores_line(example, "pruned"))
            coloured(example.get("pruned_tokens"), example.get("pruned_token_jsd"), example.get("pruned_special"),
                     unit, example.get("output_pruned"))


def divergence_example(example: dict, unit: str) -> None:
    with st.container(border=True):
        st.markdown(f"**{example.get('id', '?')}** · JSD {fmt(example.get('jsd'), '.4f')} {unit} · "
                    f"flip rate {fmt(example.get('flip_rate'), '.0%')}")
        st.caption("Instruction")
        st.text("\n\n".join(p for p in (example.get("instruction"), example.get("input")) if p) or "–")
        st.caption("Reference answer, coloured by JS divergence")
        coloured(example.get("tokens"), example.get("token_jsd"), example.get("special"), unit,
                 example.get("reference"))


db = store()
rows = finished_runs_or_stop("read its generations")

run = pick_run(rows, key="run")
rid = run["run_id"]
st.page_link("views/layers.py", label="Layers of this run", icon="🧱", query_params={"run": rid})
protocol = run.get("protocol") or {}
# a run measured without a divergence set records no unit in its protocol; its answers' JS used the spec's log base
unit = jsd_unit(protocol) or ("bits" if db.spec(rid).evaluation.log2 else "nats")
st.html(jsd_legend(unit))
st.caption("Special tokens (the stop token, chat markers) are not shown, as in the dense answer's text; the JS "
           "means still count them.")

tasks_tab, divergence_tab = st.tabs(["Task answers", "Divergence examples"])
with tasks_tab:
    examples = db.examples(rid, "task")
    if not examples:
        st.caption("This run has no task examples (it was evaluated without a task set).")
    else:
        left, middle, right = st.columns([3, 2, 1])
        which = left.radio("Show", list(FLIPS), format_func=FLIPS.get, key="flips")
        largest = middle.checkbox("Largest divergence first", value=True, key="task-sort",
                                  help="Sort by the mean JS divergence along the pruned answer.")
        cap = right.number_input("Show at most", min_value=1, max_value=1000, value=25, step=5, key="task-cap")
        chosen = filter_flips(examples, which)
        if largest:
            chosen = by_divergence(chosen, "answer_jsd")
        st.caption(f"{len(chosen)} of {len(examples)} task examples match; showing {min(cap, len(chosen))}. "
                   f"Answer JSD: {metric_note('answer_jsd', protocol)}.")
        for example in chosen[:cap]:
            task_example(example, unit)

with divergence_tab:
    examples = db.examples(rid, "divergence")
    if not examples:
        st.caption("This run has no divergence examples (it was evaluated without a divergence set).")
    else:
        cap = st.number_input("Show at most", min_value=1, max_value=1000, value=25, step=5, key="jsd-cap")
        chosen = by_divergence(examples, "jsd")
        st.caption(f"{len(examples)} divergence examples, largest JS divergence first; showing "
                   f"{min(cap, len(chosen))}. JSD: {metric_note('jsd', protocol)}.")
        for example in chosen[:cap]:
            divergence_example(example, unit)
