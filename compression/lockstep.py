"""Run one forward pass per mini-batch as threads that take turns, so a hook can pause every mini-batch at the
same point (a Linear's input), act once all have arrived (prune it), and let them all go on.

This gives a one-pass, sequential schedule over mini-batches without any per-architecture forward code: only one
thread computes at a time, so results are deterministic and the cores are not oversubscribed."""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class Aborted(Exception):
    """Another mini-batch failed; this one stops too."""


class Lockstep:
    """Round-robin turns between mini-batch threads; `wait()` hands the turn to the next unfinished thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.local = threading.local()
        self.turn = 0
        self.count = 0
        self.finished: set[int] = set()
        self.error: BaseException | None = None

    def index(self) -> int:
        """The mini-batch the calling thread runs (0 outside `run`)."""
        return getattr(self.local, "index", 0)

    def wait(self) -> None:
        """Pause the calling mini-batch until its next turn."""
        i = self.index()
        with self.cond:
            self._hand_over(i)
            self._await(i)

    def run(self, tasks: list[Callable[[], T]]) -> list[T]:
        """Run every task in its own thread, one at a time, in turns; return results in task order."""
        self.count, self.turn, self.finished, self.error = len(tasks), 0, set(), None
        results: list = [None] * len(tasks)
        threads = [threading.Thread(target=self._body, args=(i, task, results), daemon=True)
                   for i, task in enumerate(tasks)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.error is not None:
            raise self.error
        return results

    def _body(self, i: int, task: Callable[[], T], results: list) -> None:
        self.local.index = i
        try:
            with self.cond:
                self._await(i)
            with torch.no_grad():
                results[i] = task()
        except Aborted:
            return
        except BaseException as err:  # noqa: BLE001 - handed to the caller of run()
            with self.cond:
                self.error = err
                self.cond.notify_all()
            return
        with self.cond:
            self.finished.add(i)
            self._hand_over(i)

    def _hand_over(self, i: int) -> None:
        following = [(i + step) % self.count for step in range(1, self.count + 1)]
        self.turn = next((j for j in following if j not in self.finished), -1)
        self.cond.notify_all()

    def _await(self, i: int) -> None:
        self.cond.wait_for(lambda: self.turn == i or self.error is not None)
        if self.error is not None:
            raise Aborted
