"""Saving and exporting never lose anything of the user's: a foreign folder is refused before any work, a PruneScope
folder is replaced only with --overwrite and atomically, and a kill, a full disk or a read-only disk leaves the
previous model loadable. Real files, real tiny models, real processes (and real small filesystems where mount is
allowed)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from backend.runs.export import (
    SIDECAR,
    check_target,
    clean_leftovers,
    read_sidecar,
    save_pruned,
)
from backend.runs.store import Store
from tests.conftest import ROOT, error_line, run_cli, tiny_model


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under the folder (hidden ones too) with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def foreign(folder: Path) -> Path:
    """A folder of the user's: files, a hidden file and a subfolder, none written by PruneScope."""
    (folder / "thesis" / "figures").mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("do not lose me\n")
    (folder / ".bashrc").write_text("export A=1\n")
    (folder / "thesis" / "figures" / "plot.png").write_bytes(bytes(range(256)) * 10)
    return folder


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.tmp") or
                  p.name.startswith(f".{name}.old"))


def prune_cmd(model: Path, save: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "backend", "prune", "--model", str(model), "--method", "magnitude", "--sparsity",
            "0.5", "--calibration", "demo-prose", "--nsamples", "2", "--seqlen", "32", "--save", save, *extra]


def save_tiny(folder: Path, tokenizer, seed: int = 0, vocab: int = 512, **kwargs) -> torch.nn.Module:
    model = tiny_model(vocab=vocab, seed=seed)
    save_pruned(model, tokenizer, folder, {"spec": {"seed": seed}}, **kwargs)
    return model


def loads_as(folder: Path, model: torch.nn.Module) -> None:
    """The folder loads with transformers and holds exactly this model's weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    AutoTokenizer.from_pretrained(folder)


# --- prune --save: refusals come before any work ---------------------------------------------------------------

def test_save_into_a_foreign_folder_is_refused_before_pruning_and_leaves_it_byte_identical(tmp_path, tiny_folder):
    user = foreign(tmp_path / "home")
    before = snapshot(user)
    started = time.perf_counter()
    done = subprocess.run(prune_cmd(tiny_folder, str(user)), cwd=ROOT, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    assert done.returncode == 2, done.stderr
    line = error_line(done.stderr)
    assert str(user) in line and "was not written by PruneScope" in line and "pick an empty or new folder" in line
    assert "loaded" not in done.stderr and "layer" not in done.stderr  # refused before the model was loaded
    assert seconds < 20, seconds
    assert snapshot(user) == before


@pytest.mark.parametrize("spelling", [".", "~", "~/"])
def test_save_dot_or_home_is_refused(spelling, tmp_path, monkeypatch, capsys, tiny_folder):
    user = foreign(tmp_path / "user")
    before = snapshot(user)
    monkeypatch.chdir(user)
    monkeypatch.setenv("HOME", str(user))
    code, _, err = run_cli(["prune", "--model", str(tiny_folder), "--method", "wanda", "--sparsity", "0.5",
                            "--save", spelling], capsys)
    assert code == 2 and f"{user} is not empty and was not written by PruneScope" in error_line(err)
    assert "loaded" not in err and snapshot(user) == before


def test_a_prunescope_folder_is_replaced_only_with_overwrite(tmp_path, tiny_folder, tokenizer):
    save = tmp_path / "out"
    save.mkdir()  # an empty folder is fine
    save_tiny(save, tokenizer)
    assert read_sidecar(save)["spec"] == {"seed": 0} and SIDECAR in read_sidecar(save)["files"]
    before = snapshot(save)

    refused = subprocess.run(prune_cmd(tiny_folder, str(save), "--sparsity", "0.25"), cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2
    line = error_line(refused.stderr)
    assert str(save) in line and "--overwrite" in line and "loaded" not in refused.stderr
    assert snapshot(save) == before

    again = subprocess.run(prune_cmd(tiny_folder, str(save), "--sparsity", "0.25", "--overwrite", "--json"), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["save_path"] == str(save)
    assert read_sidecar(save)["spec"]["sparsity"] == 0.25
    from transformers import AutoModelForCausalLM
    w = AutoModelForCausalLM.from_pretrained(save).model.layers[0].mlp.down_proj.weight
    assert abs((w == 0).float().mean().item() - 0.25) < 0.01
    assert leftovers(tmp_path, "out") == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_never_replaces_a_foreign_folder_nor_one_holding_the_users_files(tmp_path, tokenizer):
    user = foreign(tmp_path / "user")
    before = snapshot(user)
    with pytest.raises(ValueError, match="was not written by PruneScope"):
        save_tiny(user, tokenizer, overwrite=True)
    assert snapshot(user) == before

    ours = tmp_path / "ours"
    save_tiny(ours, tokenizer)
    (ours / "my-notes.md").write_text("mine\n")
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"also holds files PruneScope did not write \(my-notes.md\)"):
        save_tiny(ours, tokenizer, seed=1, overwrite=True)
    assert snapshot(ours) == before

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_target(tmp_path / "a-file", overwrite=True)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_target(tmp_path / "a-file" / "below")


# --- kills, leftovers ------------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from backend.runs.export import save_pruned
    from tests.conftest import tiny_model

    class Stalls:
        '''A tokenizer whose save is slow: half a file written, then a long wait (the kill comes here).'''
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text('{"version": "1.0", "trunc')
            print("writing", flush=True)
            time.sleep(120)

    save_pruned(tiny_model(seed=1), Stalls(), sys.argv[1], {"spec": {"seed": 1}}, overwrite=True)
""")


def test_a_save_killed_mid_write_leaves_the_old_model_loadable_and_the_next_save_cleans_up(tmp_path, tokenizer):
    target = tmp_path / "model"
    old = save_tiny(target, tokenizer)
    before = snapshot(target)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing", child.stderr.read()
        dead_tmp = tmp_path / f".model.tmp{child.pid}"
        assert (dead_tmp / "model.safetensors").is_file()  # the new weights were on disk when it was killed
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert snapshot(target) == before
    loads_as(target, old)

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live_tmp = tmp_path / f".model.tmp{sleeper.pid}"
        others = [tmp_path / name for name in (".model.tmpabc", ".model.tmp12x", f".other.tmp{child.pid}",
                                               f"model.tmp{child.pid}", f".model.tmp{child.pid}.bak")]
        for folder in (live_tmp, *others):
            folder.mkdir()
            (folder / "keep").write_text("keep")
        new = save_tiny(target, tokenizer, seed=2, overwrite=True)
        assert not dead_tmp.exists()  # a dead process's leftover is gone
        assert live_tmp.is_dir() and all((p / "keep").read_text() == "keep" for p in others)  # nothing else
    finally:
        sleeper.kill()
        sleeper.wait()
    loads_as(target, new)
    assert read_sidecar(target)["spec"] == {"seed": 2}


def test_a_swap_killed_between_its_renames_is_put_back(tmp_path, tokenizer):
    target = tmp_path / "model"
    old = save_tiny(target, tokenizer)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.rename(target, tmp_path / f".model.old{dead.pid}")  # the old model renamed aside, the new one never in
    (tmp_path / f".model.tmp{dead.pid}").mkdir()
    assert set(clean_leftovers(target)) == {tmp_path / f".model.old{dead.pid}", tmp_path / f".model.tmp{dead.pid}"}
    assert leftovers(tmp_path, "model") == []
    loads_as(target, old)


# --- full disk, read-only, permission -------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MB tmpfs (skipped where mount is not permitted)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_leaves_the_old_folder_intact(small_disk, tokenizer):
    target = small_disk / "model"
    old = save_tiny(target, tokenizer)
    before, free = snapshot(target), os.statvfs(small_disk).f_bfree
    with pytest.raises(ValueError) as refused:
        save_tiny(target, tokenizer, seed=1, vocab=32768, overwrite=True)  # ~8.5 MB of weights
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"cannot write the pruned model to {target}: no space left on "
                                                      f"device (needs about 8.")
    assert snapshot(target) == before and leftovers(small_disk, "model") == []
    assert os.statvfs(small_disk).f_bfree == free  # the temporary folder's blocks are back
    loads_as(target, old)

    with pytest.raises(ValueError, match="no space left on device"):
        save_tiny(small_disk / "fresh", tokenizer, seed=1, vocab=32768)
    assert sorted(p.name for p in small_disk.iterdir()) == ["model"]


def test_a_read_only_disk_is_refused_up_front(small_disk, tokenizer):
    target = small_disk / "model"
    save_tiny(target, tokenizer)
    before = snapshot(target)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(ValueError, match=r"is not writable \(read-only file system\)"):
        save_tiny(target, tokenizer, seed=1, overwrite=True)
    with pytest.raises(ValueError, match=r"is not writable \(read-only file system\)"):
        check_target(small_disk / "new" / "model")
    assert snapshot(target) == before


@pytest.mark.parametrize("error,expected", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device (needs about 0.4 MB"),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "no space left on device"),  # how safetensors reports it
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
])
def test_write_errors_mid_save_are_one_line_and_remove_the_temporary_folder(error, expected, tmp_path, tokenizer):
    target = tmp_path / "model"
    old = save_tiny(target, tokenizer)
    before = snapshot(target)
    model = tiny_model(seed=1)

    def fails_midway(folder, **_):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise error

    model.save_pretrained = fails_midway
    with pytest.raises(ValueError) as refused:
        save_pruned(model, tokenizer, target, {}, overwrite=True)
    assert expected in str(refused.value) and str(target) in str(refused.value) and "\n" not in str(refused.value)
    assert snapshot(target) == before and leftovers(tmp_path, "model") == []
    loads_as(target, old)


# --- export --to ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_id(filled_store) -> str:
    return Store(filled_store).runs()[0]["run_id"]


def export(store: Path, rid: str, to: Path, capsys, *extra: str) -> tuple[int, str]:
    code, _, err = run_cli(["export", rid, "--to", str(to), "--store", str(store), *extra], capsys)
    return code, err


def test_export_into_a_folder_with_a_foreign_model_is_refused(filled_store, run_id, tmp_path, capsys):
    to = tmp_path / "out"
    foreign(to / "model")
    (to / "readme.txt").write_text("mine")
    before = snapshot(to)
    code, err = export(filled_store, run_id, to, capsys, "--overwrite")
    assert code == 2 and f"{to / 'model'} is not empty and was not written by PruneScope" in error_line(err)
    assert snapshot(to) == before


def test_export_keeps_other_files_and_replaces_its_own_only_with_overwrite(filled_store, run_id, tmp_path, capsys):
    to = foreign(tmp_path / "out")
    mine = snapshot(to)
    code, err = export(filled_store, run_id, to, capsys)
    assert code == 0, err
    assert {k: v for k, v in snapshot(to).items() if k in mine} == mine
    assert sorted(p.name for p in to.iterdir()) == [".bashrc", "layers.csv", "metrics.json", "model", "notes.txt",
                                                    "records.jsonl", "thesis"]
    assert read_sidecar(to / "model")["run_id"] == run_id
    assert json.loads((to / "metrics.json").read_text())["run_id"] == run_id
    exported = snapshot(to)

    code, err = export(filled_store, run_id, to, capsys)
    assert code == 2 and "--overwrite" in error_line(err)
    assert snapshot(to) == exported

    code, err = export(filled_store, run_id, to, capsys, "--overwrite")
    assert code == 0, err
    assert snapshot(to) == exported  # the same run again: the same bytes, the user's files untouched
    assert [p.name for p in to.iterdir() if ".tmp" in p.name or ".old" in p.name] == []

    (to / "metrics.json").unlink()
    (to / "model" / "extra.txt").write_text("mine")
    code, err = export(filled_store, run_id, to, capsys, "--overwrite")
    assert code == 2 and "also holds files PruneScope did not write (extra.txt)" in error_line(err)
    assert not (to / "metrics.json").exists()


def test_export_refuses_a_stray_metrics_file_without_overwrite(filled_store, run_id, tmp_path, capsys):
    to = tmp_path / "out"
    to.mkdir()
    (to / "metrics.json").write_text('{"mine": true}')
    code, err = export(filled_store, run_id, to, capsys)
    assert code == 2 and "already holds metrics.json: add --overwrite" in error_line(err)
    assert (to / "metrics.json").read_text() == '{"mine": true}' and sorted(os.listdir(to)) == ["metrics.json"]
