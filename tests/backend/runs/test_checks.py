"""The early checks of a submitted run (backend/runs/checks.py) on real inputs: the tiny model folder (a 128-token
context, the embedded tokenizer), real files and a real store. Each bad spec is refused with its message and queues
nothing, through the service and through the CLI; each limit a message names is the real one, found by running the
worker's own code on both sides of it."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from backend.runs import service
from backend.runs.checks import check_spec, data_dir_sources
from backend.runs.spec import EvalSettings, RunSpec, SpecError
from backend.runs.store import Store
from backend.sources.datasets import LOCAL_FILES
from tests.conftest import SHARED_DATA, TINY_EVAL, error_line, needs_shared, run_cli

EVAL = EvalSettings(ppl="demo-prose", ppl_seqlen=64, ppl_windows=2, jsd="demo", tasks="demo", limit=6,
                    max_new_tokens=4)


@pytest.fixture(autouse=True)
def no_data_dir(monkeypatch):
    monkeypatch.delenv("PRUNESCOPE_DATA_DIR", raising=False)


@pytest.fixture
def good(tiny_folder) -> RunSpec:
    return RunSpec(method="wanda", sparsity=0.5, model=str(tiny_folder), calibration="demo-prose", nsamples=4,
                   seqlen=64, evaluation=EVAL)


@pytest.fixture
def texts(tmp_path) -> Path:
    """Three short paragraphs, as a .txt file holds documents."""
    path = tmp_path / "short.txt"
    path.write_text("The cat sat on the mat.\n\nA dog ran in the park today.\n\nRain fell on the quiet town.\n")
    return path


@pytest.fixture
def records(tmp_path) -> Path:
    path = tmp_path / "tasks.jsonl"
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def jobs(root: Path) -> int:
    return Store(root).db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


def refused(root: Path, spec: RunSpec, data_dir: str | None = None) -> str:
    """The message a submission is refused with; the store queued nothing."""
    with pytest.raises(SpecError) as caught:
        service.submit(Store(root), spec, data_dir, start_worker=False)
    assert jobs(root) == 0
    return str(caught.value)


def test_a_valid_spec_passes_the_checks_and_is_queued(tmp_path, good):
    check_spec(good.normalised())
    submitted = service.submit(Store(tmp_path), good, start_worker=False)
    assert submitted["state"] == "queued" and jobs(tmp_path) == 1


def test_calibration_and_perplexity_lengths_beyond_the_context(tmp_path, good):
    assert refused(tmp_path, replace(good, seqlen=200)) == \
        "calibration seqlen 200 is beyond the model's context of 128 tokens: use at most 128"
    assert refused(tmp_path, replace(good, evaluation=replace(EVAL, ppl_seqlen=300))) == \
        "ppl-seqlen 300 is beyond the model's context of 128 tokens: use at most 128"
    check_spec(replace(good, seqlen=128, evaluation=replace(EVAL, ppl_seqlen=128)).normalised())


def test_missing_files(tmp_path, good):
    gone = tmp_path / "gone.jsonl"
    message = refused(tmp_path, replace(good, calibration=str(gone)))
    assert message.startswith("calibration: ") and f"path {gone} does not exist" in message
    assert refused(tmp_path, replace(good, calibration=str(tmp_path / "ids.pt"))) == \
        f"calibration: calibration file {str(tmp_path / 'ids.pt')!r} does not exist"
    message = refused(tmp_path, replace(good, evaluation=replace(EVAL, ppl=str(gone))))
    assert message.startswith("ppl: ") and "does not exist" in message


def test_saved_ids_of_another_shape(tmp_path, good):
    import torch
    torch.save(torch.zeros(2, 64, dtype=torch.long), tmp_path / "ids.pt")
    message = refused(tmp_path, replace(good, calibration=str(tmp_path / "ids.pt")))
    assert "holds windows of shape (2, 64), but 4 x 64 were asked" in message
    check_spec(replace(good, calibration=str(tmp_path / "ids.pt"), nsamples=2).normalised())


def test_a_perplexity_text_too_short_names_its_tokens_and_the_longest_length_that_works(tmp_path, good, texts,
                                                                                       tiny_folder, tokenizer):
    from backend.sources.datasets import load_source
    from metrics.perplexity import perplexity, token_stream
    from tests.conftest import tiny_model
    have = token_stream(load_source(str(texts)).items, tokenizer).numel()
    message = refused(tmp_path, replace(good, evaluation=replace(EVAL, ppl=str(texts), ppl_seqlen=64)))
    assert message == (f"ppl {str(texts)!r} gives {have} tokens with this model's tokenizer, fewer than one window "
                       f"of ppl-seqlen 64: use a ppl-seqlen of at most {have}, or a longer text")
    check_spec(replace(good, evaluation=replace(EVAL, ppl=str(texts), ppl_seqlen=have)).normalised())
    model = tiny_model(vocab=len(tokenizer))
    items = load_source(str(texts)).items
    assert perplexity(model, tokenizer, items, have).windows == 1
    with pytest.raises(ValueError, match="too little text"):
        perplexity(model, tokenizer, items, have + 1)


def test_calibration_documents_too_short_name_the_longest_and_agree_with_the_recipe(tmp_path, good, texts,
                                                                                     tokenizer):
    from backend.sources.datasets import load_source
    from compression.calibration import CalibrationError, windows_from_documents
    items = load_source(str(texts)).items
    longest = max(len(tokenizer(t).input_ids) for t in items)
    message = refused(tmp_path, replace(good, calibration=str(texts), seqlen=longest))
    assert message == (f"calibration {str(texts)!r}: none of its 3 documents has more than seqlen {longest} tokens "
                       f"(the longest has {longest}): use a seqlen of at most {longest - 1} or more text")
    check_spec(replace(good, calibration=str(texts), seqlen=longest - 1).normalised())
    assert windows_from_documents(items, tokenizer, 4, longest - 1).shape == (4, longest - 1)
    with pytest.raises(CalibrationError):
        windows_from_documents(items, tokenizer, 4, longest)


def test_calibration_records_too_few_name_their_tokens_and_agree_with_the_recipe(tmp_path, good, records,
                                                                                 tokenizer):
    from backend.sources.datasets import load_source
    from compression.calibration import CalibrationError, windows_from_records
    from metrics.prompts import full_text_renderer
    items = load_source(str(records)).items
    render = full_text_renderer("alpaca", tokenizer)
    have = sum(len(tokenizer(render(r), add_special_tokens=False).input_ids) + 1 for r in items)
    message = refused(tmp_path, replace(good, calibration=str(records), nsamples=1, seqlen=have + 1))
    assert message == (f"calibration {str(records)!r}: its 2 records give {have} tokens but nsamples x seqlen = "
                       f"1 x {have + 1} = {have + 1} are needed: lower seqlen to at most {have}, or use more text")
    check_spec(replace(good, calibration=str(records), nsamples=1, seqlen=have).normalised())
    assert windows_from_records(items, tokenizer, render, 1, have).shape == (1, have)
    with pytest.raises(CalibrationError):
        windows_from_records(items, tokenizer, render, 1, have + 1)


def test_records_sources_that_hold_texts_and_sources_not_available_offline(tmp_path, good, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = refused(tmp_path, replace(good, evaluation=replace(EVAL, jsd="demo-prose")))
    assert message.startswith("jsd: source 'demo-prose' holds plain texts; divergence and tasks need instruction "
                              "records")
    message = refused(tmp_path, replace(good, evaluation=replace(EVAL, tasks="alpaca")))
    assert message.startswith("tasks: data source 'alpaca' is not available offline: no data dir is set")
    message = refused(tmp_path, replace(good, calibration="c4"), str(tmp_path / "no-such-folder"))
    assert message.startswith("calibration: data source 'c4' is not available offline: data dir") \
        and "does not exist" in message


def test_a_source_only_the_hub_has_is_left_to_the_worker_when_the_hub_answers(good, monkeypatch):
    """Nothing is downloaded to check it: a hub that answers (here a local listener) lets the run through."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        check_spec(replace(good, calibration="c4", evaluation=replace(EVAL, ppl="wikitext2", jsd="alpaca")).normalised())


@needs_shared
def test_a_grid_with_one_bad_spec_queues_none_of_it(tmp_path, good):
    specs = [good, replace(good, method="magnitude"), replace(good, calibration="wikitext2", seqlen=128,
                                                             nsamples=4, evaluation=replace(EVAL, ppl_seqlen=128))]
    service.submit_many(Store(tmp_path / "fine"), specs, str(SHARED_DATA), start_worker=False)
    assert jobs(tmp_path / "fine") == 3
    bad = [*specs, replace(good, calibration="c4", seqlen=129)]
    with pytest.raises(SpecError, match="calibration seqlen 129 is beyond the model's context of 128"):
        service.submit_many(Store(tmp_path / "bad"), bad, str(SHARED_DATA), start_worker=False)
    assert jobs(tmp_path / "bad") == 0


def test_data_dir_sources(tmp_path):
    with pytest.raises(SpecError, match=f"data folder {tmp_path / 'none'} does not exist: give a folder holding any "
                                        f"of {LOCAL_FILES['c4']}"):
        data_dir_sources(str(tmp_path / "none"))
    with pytest.raises(SpecError, match="holds none of the expected files"):
        data_dir_sources(str(tmp_path))
    (tmp_path / "alpaca").mkdir()
    (tmp_path / LOCAL_FILES["alpaca"]).write_text('{"instruction": "a", "output": "b"}\n')
    assert data_dir_sources(str(tmp_path)) == ["alpaca"]


def test_the_embedded_context_before_conversion_is_the_converted_config_s(embedded_folder, monkeypatch, tmp_path):
    from transformers import AutoConfig

    from backend.sources import models
    from compression.calibration import model_context
    assert models.context_length("smollm2-135m") == model_context(AutoConfig.from_pretrained(embedded_folder))
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path))
    assert models.converted_folder("smollm2-135m") is None
    assert models.context_length("smollm2-135m") == models.EMBEDDED_CONTEXT["smollm2-135m"] \
        == model_context(AutoConfig.from_pretrained(embedded_folder))


def test_the_embedded_tokenizer_before_conversion_counts_as_the_converted_one(embedded_folder, tokenizer,
                                                                               monkeypatch, tmp_path):
    from backend.sources import models
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path))
    text = (Path(models.__file__).parent / "demo" / "demo_prose.txt").read_text()
    assert models.load_tokenizer("smollm2-135m")(text).input_ids == tokenizer(text).input_ids


# the same checks through the CLI: one error line, exit 2, nothing queued

def cli_run(tmp_path, tiny_folder, *extra: str) -> list[str]:
    base = {"--calibration": "demo-prose", "--nsamples": "4", "--seqlen": "64"}
    flags = dict(zip(TINY_EVAL[::2], TINY_EVAL[1::2]))
    given = dict(zip(extra[::2], extra[1::2]))
    merged = {**base, **flags, **given}
    return ["run", "--model", str(tiny_folder), "--method", "wanda", "--sparsity", "0.5",
            *[item for pair in merged.items() for item in pair], "--store", str(tmp_path / "store"), "--detach"]


@pytest.mark.parametrize("extra,expected", [
    (("--seqlen", "200"), "error: calibration seqlen 200 is beyond the model's context of 128 tokens: use at most 128"),
    (("--ppl-seqlen", "300"), "error: ppl-seqlen 300 is beyond the model's context of 128 tokens: use at most 128"),
    (("--calibration", "/no/such/file.jsonl"), "path /no/such/file.jsonl does not exist"),
    (("--calibration", "demo", "--nsamples", "64", "--seqlen", "100"),
     "error: calibration 'demo': its 66 records (6 more held out: the evaluation reads them) give"),
    (("--jsd", "demo-prose"), "error: jsd: source 'demo-prose' holds plain texts"),
    (("--tasks", "unnatural"), "error: tasks: data source 'unnatural' is not available offline"),
])
def test_the_cli_run_prints_one_error_line_and_queues_nothing(tmp_path, tiny_folder, capsys, extra, expected):
    code, _, err = run_cli(cli_run(tmp_path, tiny_folder, *extra), capsys)
    assert code == 2 and expected in error_line(err)
    assert jobs(tmp_path / "store") == 0


def test_the_cli_ppl_text_too_short(tmp_path, tiny_folder, texts, capsys):
    code, _, err = run_cli(cli_run(tmp_path, tiny_folder, "--ppl", str(texts)), capsys)
    assert code == 2 and f"error: ppl {str(texts)!r} gives" in error_line(err)
    assert jobs(tmp_path / "store") == 0


def test_the_cli_sweep_with_one_bad_calibration_queues_nothing(tmp_path, tiny_folder, capsys):
    code, _, err = run_cli(["sweep", "--model", str(tiny_folder), "--methods", "wanda", "magnitude",
                            "--calibrations", "demo-prose", "demo", "--nsamples", "64", "--seqlen", "100", *TINY_EVAL,
                            "--store", str(tmp_path / "store"), "--detach"], capsys)
    assert code == 2 and "error: calibration 'demo': its 66 records (6 more held out" in error_line(err)
    assert jobs(tmp_path / "store") == 0


def test_the_cli_prune_ppl_and_eval_use_the_same_checks(tmp_path, tiny_folder, texts, capsys):
    code, _, err = run_cli(["prune", "--model", str(tiny_folder), "--method", "wanda", "--sparsity", "0.5",
                            "--calibration", str(texts), "--nsamples", "2", "--seqlen", "100",
                            "--save", str(tmp_path / "out")], capsys)
    assert code == 2 and f"error: calibration {str(texts)!r}: none of its 3 documents has more than seqlen 100" \
        in error_line(err)
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(["ppl", "--model", str(tiny_folder), "--data", str(texts), "--seqlen", "100"], capsys)
    assert code == 2 and "fewer than one window of seqlen 100: use a seqlen of at most" in error_line(err)
    code, _, err = run_cli(["eval", "--dense", str(tiny_folder), "--pruned", str(tiny_folder), "--ppl", str(texts),
                            "--ppl-seqlen", "100"], capsys)
    assert code == 2 and f"error: ppl {str(texts)!r} gives" in error_line(err)


def test_calibration_holds_out_the_records_its_evaluation_reads_from_the_same_source(tmp_path, good, records,
                                                                                       tokenizer):
    from metrics.prompts import full_text_renderer
    assert good.held_out_records() == 0  # demo-prose calibration, demo evaluation
    same = replace(good, calibration="demo")
    assert same.held_out_records() == 6
    assert replace(same, evaluation=replace(EVAL, jsd_limit=10)).held_out_records() == 10
    assert replace(same, evaluation=replace(EVAL, jsd=None, tasks="demo-prose")).held_out_records() == 0
    spelled = replace(good, calibration=str(records),
                      evaluation=replace(EVAL, jsd=str(records.parent / "." / records.name), jsd_limit=1, tasks=None))
    assert spelled.held_out_records() == 1  # one file, however its path is spelled
    second = full_text_renderer("alpaca", tokenizer)({"instruction": "Add the numbers.", "input": "2 and 3",
                                                      "output": "5"})
    have = len(tokenizer(second, add_special_tokens=False).input_ids) + 1
    message = refused(tmp_path, replace(spelled, nsamples=1, seqlen=have + 1))
    assert message.startswith(f"calibration {str(records)!r}: its 1 records (1 more held out: the evaluation reads "
                              f"them) give {have} tokens")
