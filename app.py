"""PruneScope dashboard entry point (a landing page until the dashboard pages land)."""

import streamlit as st

st.set_page_config(page_title="PruneScope", page_icon="✂️", layout="wide")
st.title("✂️ PruneScope")
st.markdown(
    "See what pruning really does to a language model, beyond perplexity: prune any Hugging Face causal LM with "
    "**Magnitude**, **Wanda** or **SparseGPT** (unstructured, 2:4, 4:8), then compare dense and pruned models."
)
st.subheader("Use it now from the command line")
st.code(
    "python -m backend prune --method wanda --sparsity 0.5 --calibration c4 --nsamples 32 --seqlen 256 "
    "--data-dir ../shared/data --save out/wanda50\n"
    "python -m backend ppl --model out/wanda50 --data wikitext2 --seqlen 512 --windows 40 --data-dir ../shared/data",
    language="bash",
)
st.caption("Default model: smollm2-135m (SmolLM2-135M-Instruct, embedded, dequantized from its GGUF file).")
