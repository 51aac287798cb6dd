"""PruneScope dashboard: navigation over thin pages that read the results store and submit work to the worker."""

import streamlit as st

st.set_page_config(page_title="PruneScope", page_icon="✂️", layout="wide")
PAGES = [
    st.Page("views/home.py", title="Home", icon="🏠", default=True),
    st.Page("views/run.py", title="Run", icon="🚀"),
    st.Page("views/runs.py", title="Runs", icon="🗂️"),
    st.Page("views/compare.py", title="Compare", icon="📈"),
    st.Page("views/findings.py", title="Findings", icon="🔎"),
    st.Page("views/layers.py", title="Layers", icon="🧱"),
    st.Page("views/generations.py", title="Generations", icon="💬"),
]
st.navigation(PAGES).run()
