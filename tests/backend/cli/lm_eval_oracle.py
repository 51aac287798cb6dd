"""lm-eval's own evaluator as an oracle for several saved model folders in one process: `python lm_eval_oracle.py
TASKS_FOLDER TASK`, run from TASKS_FOLDER, reads one JSON line {"folder", "limit"} at a time from stdin and answers
each with one JSON line of lm-eval's results for TASK on that folder. Each answer is what `python -m lm_eval --model
hf --model_args pretrained=FOLDER,dtype=float32 --tasks TASK --include_path TASKS_FOLDER --device cpu --batch_size 16
--limit N` computes (the same simple_evaluate call with the CLI's defaults, lm-eval's own HF model loading the
folder), without the CLI's index of lm-eval's ~15k built-in tasks, which it cannot skip and which takes ~13 s a
run. No PruneScope code is imported."""

from __future__ import annotations

import json
import sys

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager


def main(folder: str, task: str) -> None:
    manager = TaskManager(include_path=folder, include_defaults=False)
    for line in sys.stdin:
        asked = json.loads(line)
        results = simple_evaluate(model="hf", model_args=f"pretrained={asked['folder']},dtype=float32", tasks=[task],
                                  batch_size=16, device="cpu", limit=asked["limit"], task_manager=manager)
        print(json.dumps({"effective": results["n-samples"][task]["effective"], "results": results["results"][task]},
                         default=str), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
