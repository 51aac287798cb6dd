"""The Python API's runnable example works as written, on a tiny model and a fresh store."""

from __future__ import annotations

import re
import subprocess
import sys

from backend.runs.worker import stop_worker
from tests.conftest import ROOT


def test_the_notebook_example_runs_end_to_end(tiny_folder, tmp_path):
    store = tmp_path / "store"
    try:
        done = subprocess.run([sys.executable, "examples/notebook.py", "--model", str(tiny_folder), "--store", str(store)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        stop_worker(store)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"pruned 14 matrices: sparsity 0\.500 in the decoder layers", out), out
    assert re.search(r"perplexity [\d.]+ -> [\d.]+, JS 0\.\d{4}, F1 [\d.]+ -> [\d.]+; 16 example records", out), out
    assert re.search(r"perplexity ratio [\d.]+, 95% interval \[[\d.]+, [\d.]+\] paired over 4 windows", out), out
    assert re.search(r"run [0-9a-f]+: done, perplexity [\d.]+ -> [\d.]+", out), out
    assert "1 run(s) in the store" in out
