"""Shared fixtures: the shared data folder, the embedded model folder and tiny random-init models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from backend.runs.worker import stop_worker

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir() and not IN_CI, reason=f"no shared data folder at {SHARED_DATA}")


def pytest_sessionstart(session) -> None:
    """In CI every test must run: a missing shared data folder fails the run instead of skipping its tests."""
    if IN_CI and not SHARED_DATA.is_dir():
        raise pytest.UsageError(f"CI is set but the shared data folder {SHARED_DATA} is missing; tests that read "
                                f"it would be skipped")


@pytest.fixture(scope="session")
def embedded_folder() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once into the user cache."""
    from backend.sources.models import ensure_embedded
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
    # sliding-window attention, every layer (window 8 < the 32-token test windows, so it changes the output)
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=8),
    # layer 0 full attention, layers 1-2 sliding (max_window_layers=1): layers get different masks
    "qwen2_window": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
    # sliding / full / sliding (Gemma2's default alternation), eager attention (its default, for soft-capping)
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                   max_position_embeddings=256, sliding_window=8),
    # text-only Gemma3: sliding / full / sliding, with a different RoPE base for each type
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                   max_position_embeddings=256, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # fused qkv_proj and gate_up_proj Linears
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256),
    # MoE with fused 3-D expert parameters: 4 experts, top-2
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    num_local_experts=4, num_experts_per_tok=2),
    # transposed experts ([E, in, out]) with biases, interleaved gate/up and its own gate function
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=256, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"]),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, moe_intermediate_size=32, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=256, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                      mlp_only_layers=[]),
}


def tiny_model(arch: str = "llama", vocab: int = 512, seed: int = 0, layers: int | None = None) -> torch.nn.Module:
    """A small random-init causal LM of a real transformers architecture (`layers` decoder layers if given)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    options = dict(TINY[arch], **({"num_hidden_layers": layers} if layers else {}))
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


@pytest.fixture(scope="session")
def two_protocols_store(filled_store, tiny_folder, tmp_path_factory) -> Path:
    """A copy of the filled store plus one Wanda run whose perplexity read 1 window instead of 2 (another protocol),
    by the real CLI and worker; read-only for its users."""
    root = tmp_path_factory.mktemp("two-protocols") / "store"
    shutil.copytree(filled_store, root, ignore=shutil.ignore_patterns("*.lock", "runs"))
    fewer = list(TINY_EVAL)
    fewer[fewer.index("--ppl-windows") + 1] = "1"
    try:
        backend_cli(root, "run", "--model", str(tiny_folder), "--method", "wanda", "--sparsity", "0.5",
                    "--calibration", "demo-prose", "--nsamples", "4", "--seqlen", "64", *fewer)
    finally:
        stop_worker(root)
    return root


@pytest.fixture(scope="session")
def owl_store(tmp_path_factory, tiny_folder) -> Path:
    """A store with RIA on the tiny model at 60%, uniform and OWL-allocated, made by the real CLI and worker."""
    root = tmp_path_factory.mktemp("owl-store")
    backend_cli(root, "sweep", "--model", str(tiny_folder), "--methods", "ria", "--sparsities", "0.6",
                "--allocations", "uniform", "owl", "--calibrations", "demo-prose", "--nsamples", "4", "--seqlen", "64",
                *TINY_EVAL)
    yield root
    stop_worker(root)


LM_EVAL = ("--lm-eval", "prunescope_facts", "--lm-eval-limit", "24")


@pytest.fixture(scope="session")
def lm_store(tmp_path_factory, tiny_folder) -> Path:
    """A store with Wanda and SparseGPT at 50% on the tiny model, each scored by lm-eval on PruneScope's own task
    (24 documents) alone, made by the real CLI and worker."""
    root = tmp_path_factory.mktemp("lm-store")
    backend_cli(root, "sweep", "--model", str(tiny_folder), "--methods", "wanda", "sparsegpt", "--sparsities", "0.5",
                "--calibrations", "demo-prose", "--nsamples", "4", "--seqlen", "64", *LM_EVAL)
    yield root
    stop_worker(root)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Say how many tests were skipped, plainly, so a CI log shows at a glance that everything ran."""
    skipped = len(terminalreporter.stats.get("skipped", []))
    terminalreporter.write_line(f"skipped tests: {skipped}" + (" (reasons above)" if skipped else ""))


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """The CLI's main in this process: exit code, stdout, stderr."""
    from backend.cli.parser import main
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one `error:` line a refused command prints."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def copy_store(source: Path, target: Path) -> Path:
    """A copy of a store (not its lock) whose artifact rows point into the copy, as its worker would write them."""
    import shutil

    from backend.runs.store import Store
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.lock"))
    db = Store(target)
    with db.write() as conn:
        for row in conn.execute("SELECT run_id, name FROM artifacts").fetchall():
            conn.execute("UPDATE artifacts SET path = ? WHERE run_id = ? AND name = ?",
                         (str((target / "runs" / row["run_id"] / row["name"]).resolve()), row["run_id"], row["name"]))
    db.close()
    return target
