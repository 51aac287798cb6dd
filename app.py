"""PruneScope dashboard: navigation over thin pages that read the results store and submit work to the worker."""

import streamlit as st

st.set_page_config(page_title="PruneScope", page_icon="✂️", layout="wide")
PAGES = [
    st.Page("pages/home.py", title="Home", icon="🏠", default=True),
    st.Page("pages/run.py", title="Run", icon="🚀"),
    st.Page("pages/compare.py", title="Compare", icon="📈"),
    st.Page("pages/layers.py", title="Layers", icon="🧱"),
    st.Page("pages/generations.py", title="Generations", icon="💬"),
]
st.navigation(PAGES).run()
