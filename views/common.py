"""Helpers shared by the pages: the store, the run picker bound to the URL, and small formatting."""

from __future__ import annotations

import html
import math
import os
import re
from typing import Mapping

import streamlit as st

from backend.runs.store import Store, StoreError


def store() -> Store:
    """The results store the CLI uses too ($PRUNESCOPE_STORE, else the user data directory)."""
    return Store()


def finished_runs_or_stop(purpose: str) -> list[dict]:
    """The store's finished runs; with none (or an unreadable store) says so, links to the Run page and stops."""
    try:
        rows = [r for r in store().runs() if r["state"] == "done"]
    except StoreError as err:
        st.error(str(err))
        st.stop()
    if not rows:
        st.info(f"No finished runs yet: start one on the Run page, then {purpose} here.")
        st.page_link("views/run.py", label="Run", icon="🚀")
        st.stop()
    return rows


def data_dir() -> str | None:
    """The data folder for named sources: the one chosen on the Run page, else $PRUNESCOPE_DATA_DIR."""
    return st.session_state.get("data_dir") or os.environ.get("PRUNESCOPE_DATA_DIR") or None


def label(row: dict) -> str:
    """A run as one line: id, method, sparsity, pattern, calibration, model."""
    name = os.path.basename(str(row["model"]).rstrip("/")) or row["model"]
    allocation = row.get("allocation") or "uniform"
    return (f"{row['run_id'][:8]} · {row['method']} {row['sparsity']:.0%} {row['pattern']}"
            + ("" if allocation == "uniform" else f" {allocation}")
            + f" · {os.path.basename(row['calibration'])} · {name}"
            + (" · other code" if row.get("other_code") else ""))


def pick_run(rows: list[dict], key: str = "run", title: str = "Run", optional: bool = False) -> dict | None:
    """A run selector whose choice lives in the URL's query parameter `key`, so the view can be shared."""
    if not rows:
        return None
    ids = [r["run_id"] for r in rows]
    wanted = st.query_params.get(key)
    options = ([None] if optional else []) + ids
    index = options.index(wanted) if wanted in options else 0
    by_id = {r["run_id"]: r for r in rows}
    chosen = st.selectbox(title, options, index=index, key=f"pick-{key}",
                          format_func=lambda rid: "—" if rid is None else label(by_id[rid]))
    if chosen is None:
        st.query_params.pop(key, None)
        return None
    if st.query_params.get(key) != chosen:
        st.query_params[key] = chosen
    return by_id[chosen]


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


@st.cache_data(show_spinner="Bootstrapping the rank correlations ...", max_entries=32)
def predictor_ranking(run_ids: tuple[str, ...], task: str, root: str | None = None) -> dict:
    """The predictors ranking (backend.findings.predictors) of these runs, cached by run ids, task and store: its
    table, sentence, the runs it used and how many were left out for lack of per-example values."""
    from backend.findings.evidence import with_units
    from backend.findings.predictors import ranking

    db = Store(root) if root else store()
    rows = [r for r in db.runs() if r["run_id"] in set(run_ids)]
    evidence, left_out = with_units(db, rows)
    found = ranking(evidence, task)
    return {"table": found.table, "sentence": found.sentence(), "runs": found.runs, "left_out": len(left_out)}


@st.cache_data(max_entries=64)
def paired_differences(a: str, b: str, root: str):
    """Run b minus run a of every pruned metric both measured, with paired intervals, as a table; the reason as a
    string when they cannot be paired (a run without per-unit values, two protocols)."""
    import pandas as pd

    from backend.findings.between import compare_runs
    from backend.reports.charts import interval_text

    try:
        _, _, found = compare_runs(Store(root), a, b)
    except ValueError as err:
        return str(err)
    return pd.DataFrame([{"metric": d.metric, "B - A": d.point, "95% interval": interval_text(d.interval, ".4g"),
                          "units": f"{d.units} {d.unit}", "reading": d.reading()} for d in found])


def confirmed_delete(rid: str, prefix: str) -> dict | None:
    """A confirmation tick and a Delete button for one run; the result of `cleanup.delete_runs` once it is deleted,
    else None (a warning without the tick, the backend's message when it refuses). Widget keys start with `prefix`;
    the tick is new for each deletion."""
    from backend.runs import cleanup
    round_ = st.session_state.setdefault(f"{prefix}-round", 0)
    sure = st.checkbox("Yes, delete this run for good", key=f"{prefix}-confirm-{round_}")
    if not st.button("Delete", icon="🗑️", key=f"{prefix}-button"):
        return None
    if not sure:
        st.warning("Tick the confirmation first: deleting cannot be undone.")
        return None
    try:
        result = cleanup.delete_runs(store(), [rid])
    except StoreError as err:
        st.error(str(err))
        return None
    st.session_state[f"{prefix}-round"] = round_ + 1
    return result


def fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def md_escape(text: str) -> str:
    """Text shown literally inside Streamlit markdown: its markdown punctuation backslash-escaped."""
    return re.sub(r"([\\`*_{}\[\]()#+!|<>~$])", r"\\\1", str(text))


# helpers of the Compare, Layers and Generations pages (pure: no Streamlit calls, so tests import them)

LN2 = math.log(2)
JSD_MAX = {"nats": LN2, "bits": 1.0}
JSD_RGB = (239, 85, 59)
# special-token text, only for records made before runs marked their special tokens (`special`, `pruned_special`)
OLD_SPECIAL = re.compile(r"<\|[^<>|\s]+\|>|</?s>|<(?:bos|eos|pad|unk)>|\[(?:PAD|CLS|SEP|UNK|MASK)\]")


def filter_value(row: dict, field: str) -> str:
    """A run's value of a filter field as the string kept in the URL (sparsity as 0.5, not 0.5000)."""
    value = row.get(field)
    if value is None:
        return "–"
    return format(value, "g") if isinstance(value, float) else str(value)


def filter_rows(rows: list[dict], chosen: dict[str, list[str]]) -> list[dict]:
    """The rows whose every filtered field is one of the chosen values; an empty choice keeps all."""
    return [r for r in rows if all(not values or filter_value(r, field) in values for field, values in chosen.items())]


def selected_run(event, fig) -> str | None:
    """The run id of the first selected point of a tradeoff scatter's selection event: the point's customdata[0],
    else its curve_number / point_index looked up in the figure's traces; None when nothing is selected."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return None
    for point in points or []:
        custom = point.get("customdata")
        if isinstance(custom, (list, tuple)) and custom and isinstance(custom[0], str):
            return custom[0]
        if isinstance(custom, str):
            return custom
        curve = point.get("curve_number")
        index = point.get("point_index", point.get("point_number"))
        if curve is None or index is None or not 0 <= curve < len(fig.data):
            continue
        data = fig.data[curve].customdata
        if data is not None and 0 <= index < len(data):
            item = data[index]
            return str(item if isinstance(item, str) else item[0])
    return None


def _em(example: dict, side: str) -> float | None:
    scores = example.get(side)
    value = scores.get("em") if isinstance(scores, dict) else None
    return example.get(f"em_{side}") if value is None else value


FLIPS = {"all": "all examples", "lost": "only flipped: right under dense, wrong pruned",
         "gained": "only flipped the other way: wrong under dense, right pruned"}


def filter_flips(examples: list[dict], which: str = "all") -> list[dict]:
    """Task examples whose exact match flipped: "lost" (dense EM 1, pruned EM 0), "gained" (the reverse), or all."""
    if which == "all":
        return list(examples)
    if which not in FLIPS:
        raise ValueError(f"unknown flip filter {which!r}: use one of {', '.join(FLIPS)}")
    want = (1.0, 0.0) if which == "lost" else (0.0, 1.0)
    return [e for e in examples if (_em(e, "dense"), _em(e, "pruned")) == want]


def by_divergence(examples: list[dict], key: str) -> list[dict]:
    """Examples with the largest `key` first; those without a value last, in their order."""
    def value(example: dict) -> float:
        v = example.get(key)
        return -float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf
    return sorted(examples, key=value)


def _alpha(value, top: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or top <= 0:
        return 0.0
    return min(max(value / top, 0.0), 1.0)


def jsd_unit(protocol: Mapping) -> str | None:
    """The unit (nats or bits) a run's protocol records for its divergences; None when it does not say."""
    return (protocol.get("divergence") or {}).get("unit")


def _top(unit: str) -> float:
    if unit not in JSD_MAX:
        raise ValueError(f"unknown JS divergence unit {unit!r}: use one of {', '.join(JSD_MAX)}")
    return JSD_MAX[unit]


def visible_tokens(tokens: list[str], values: list[float | None],
                   special: list[bool] | None = None) -> tuple[list[str], list[float | None], int]:
    """The tokens to show and their values, still aligned, without special tokens (which the dense answer's text
    leaves out too): those the record marks in `special`, or, in an older record without marks, those whose whole
    text is special-token text; and how many were hidden."""
    marks = special if isinstance(special, list) and len(special) == len(tokens) else [
        bool(OLD_SPECIAL.fullmatch(str(t).strip())) for t in tokens]
    padded = list(values[:len(tokens)]) + [None] * (len(tokens) - len(values))
    kept = [(t, v) for t, v, hidden in zip(tokens, padded, marks) if not hidden]
    return [t for t, _ in kept], [v for _, v in kept], len(tokens) - len(kept)


def token_html(tokens: list[str], values: list[float | None], unit: str = "nats") -> str:
    """Tokens as escaped HTML spans whose background opacity is value / JSD's maximum in `unit` (ln 2 nats, 1 bit),
    each titled with its value; tokens past the end of `values` are left uncoloured."""
    top = _top(unit)
    r, g, b = JSD_RGB
    spans = []
    for i, token in enumerate(tokens):
        value = values[i] if i < len(values) else None
        title = f"JSD {value:.4f} {unit}" if isinstance(value, (int, float)) else "JSD –"
        spans.append(f'<span style="background-color: rgba({r}, {g}, {b}, {_alpha(value, top):.3f}); '
                     f'border-radius: 3px" title="{html.escape(title)}">{html.escape(str(token))}</span>')
    return ('<div style="white-space: pre-wrap; line-height: 1.7; font-family: ui-monospace, monospace; '
            'font-size: 0.9em">' + "".join(spans) + "</div>")


def jsd_legend(unit: str = "nats") -> str:
    """A one-line legend of the token colouring, from 0 to the maximum JSD in `unit`."""
    top = _top(unit)
    r, g, b = JSD_RGB
    steps = "".join(f'<span style="background-color: rgba({r}, {g}, {b}, {f:.2f}); padding: 0 0.6em" '
                    f'title="JSD {f * top:.3f} {unit}">{f * top:.2f}</span>' for f in (0, 0.25, 0.5, 0.75, 1))
    return (f'<div style="font-size: 0.85em">token background = Jensen-Shannon divergence of dense vs pruned '
            f'next-token distributions ({unit}, max {top:.3f}): {steps}</div>')
