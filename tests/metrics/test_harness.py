"""lm-eval on a model in memory (metrics/harness.py) with a real tiny model and real task YAMLs: a user's folder with
relative data files works from any working directory, the progress counts lm-eval's own requests, per-document
values average to lm-eval's score, and a malformed YAML or a missing data file is named in one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from backend.sources.lm_tasks import SHIPPED, SHIPPED_TASK
from metrics.harness import run_tasks, yaml_problem
from tests.conftest import tiny_model

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
metadata:
  version: 2.0
"""


@pytest.fixture(scope="module")
def own_tasks(tmp_path_factory) -> Path:
    """A user's task folder: a YAML reading a relative JSONL beside it (ten of the shipped questions)."""
    folder = tmp_path_factory.mktemp("own-tasks")
    rows = (SHIPPED / f"{SHIPPED_TASK}.jsonl").read_text().splitlines()[:10]
    (folder / "data").mkdir()
    (folder / "data" / "ten.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "ten.yaml").write_text(TASK_YAML.format(name="ten_facts", data="data/ten.jsonl"))
    return folder


def test_a_users_task_folder_reads_its_relative_data_from_any_working_directory(own_tasks, tokenizer, tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the task folder: lm-eval alone would look for data/ten.jsonl here
    model = tiny_model(vocab=len(tokenizer))
    seen: list[tuple[int, int]] = []
    result = run_tasks(model, tokenizer, ["ten_facts"], [SHIPPED, own_tasks], batch_size=4,
                       progress=lambda done, total: seen.append((done, total)))
    assert os.getcwd() == str(tmp_path)
    assert result.examples == {"ten_facts": 10} and result.versions == {"ten_facts": "2.0"}
    assert result.fewshot == {"ten_facts": 0}
    documents = result.documents["ten_facts"]["acc"]
    assert len(documents) == 10 and set(documents) <= {0.0, 1.0}
    assert abs(sum(documents) / 10 - result.scores["ten_facts"]["acc"]) < 1e-12
    assert result.scores["ten_facts"]["acc_stderr"] > 0
    # lm-eval's own count: four choices per question, each a request, ticked from 0 to all of them
    assert seen[0] == (0, 40) and seen[-1] == (40, 40)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_malformed_yaml_and_a_missing_data_file_are_named_in_one_line(own_tasks, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(own_tasks, broken)
    (broken / "ten.yaml").write_text("task: ten_facts\ndataset_path: json\n  data_files: [oops\n")
    problem = yaml_problem(broken)
    assert problem.startswith(f"lm-eval task file {broken / 'ten.yaml'}, line 3:") and "\n" not in problem
    (broken / "ten.yaml").write_text(TASK_YAML.format(name="ten_facts", data="data/gone.jsonl"))
    problem = yaml_problem(broken)
    assert "reads data/gone.jsonl, which does not exist" in problem and str(broken) in problem
    assert yaml_problem(own_tasks) is None and yaml_problem(SHIPPED) is None


def test_the_shipped_task_is_eighty_four_way_questions_with_balanced_answers():
    rows = [json.loads(line) for line in (SHIPPED / f"{SHIPPED_TASK}.jsonl").read_text().splitlines()]
    assert len(rows) == 80 and len({r["question"] for r in rows}) == 80
    assert all(len(r["choices"]) == 4 and len(set(r["choices"])) == 4 for r in rows)
    assert sorted(r["answer"] for r in rows) == sorted([0, 1, 2, 3] * 20)
