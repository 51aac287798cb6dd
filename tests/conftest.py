"""Shared fixtures: the shared data folder, the embedded model folder and tiny random-init models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from backend.worker import stop_worker

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no shared data folder at {SHARED_DATA}")


@pytest.fixture(scope="session")
def embedded_folder() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once into the user cache."""
    from backend.models import ensure_embedded
    return ensure_embedded()


@pytest.fixture(scope="session")
def tokenizer(embedded_folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(embedded_folder)


TINY = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, word_embed_proj_dim=64),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256),
}


def tiny_model(arch: str = "llama", vocab: int = 512, seed: int = 0) -> torch.nn.Module:
    """A small random-init causal LM of a real transformers architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM
    options = dict(TINY[arch])
    config = AutoConfig.for_model(options.pop("model_type"), vocab_size=vocab, **options)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def random_windows(nsamples: int = 8, seqlen: int = 32, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama with the embedded tokenizer saved as a Hugging Face folder, with a 128-token context."""
    from transformers import AutoConfig, AutoModelForCausalLM
    options = dict(TINY["llama"], max_position_embeddings=128)
    config = AutoConfig.for_model(options.pop("model_type"), vocab_size=len(tokenizer), **options)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def backend_cli(store: Path, *args: str, check: bool = True) -> dict:
    """`python -m backend ... --store S --json` in a fresh process; returns its JSON."""
    import json
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "backend", *args, "--store", str(store), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout) if done.stdout.strip() else {"returncode": done.returncode, "stderr": done.stderr}


TINY_EVAL = ("--ppl", "demo-prose", "--ppl-seqlen", "64", "--ppl-windows", "2", "--jsd", "demo", "--tasks", "demo",
             "--limit", "6", "--max-new-tokens", "4")


@pytest.fixture(scope="session")
def filled_store(tmp_path_factory, tiny_folder) -> Path:
    """A store with four finished runs of the tiny model (wanda and magnitude x two built-in calibration sets),
    made by the real CLI and worker; offline, so it needs no shared data."""
    root = tmp_path_factory.mktemp("filled-store")
    backend_cli(root, "sweep", "--model", str(tiny_folder), "--methods", "wanda", "magnitude", "--sparsities", "0.5",
                "--calibrations", "demo-prose", "demo", "--nsamples", "4", "--seqlen", "64", *TINY_EVAL)
    yield root
    stop_worker(root)
