"""Run one forward pass per mini-batch as coroutines that take turns, so a hook can pause every mini-batch at the
same point (a Linear's input), act once all have arrived (prune it), and let them all go on.

This gives a one-pass, sequential schedule over mini-batches without any per-architecture forward code. Greenlets
run in the calling thread, so torch keeps one intra-op thread pool (OS threads would each spin up their own and
fight over the cores: measured 60% slower) and the grad mode of the caller applies."""

from __future__ import annotations

from typing import Callable, TypeVar

from greenlet import getcurrent, greenlet

T = TypeVar("T")


class Lockstep:
    """Round-robin turns between mini-batch coroutines; `wait()` pauses the running one until its next turn."""

    def __init__(self) -> None:
        self.current = 0
        self.scheduler: greenlet | None = None

    def index(self) -> int:
        """The mini-batch now running."""
        return self.current

    def wait(self) -> None:
        """Pause the running mini-batch; the scheduler resumes the next one."""
        if self.scheduler is not None and getcurrent() is not self.scheduler:
            self.scheduler.switch()

    def run(self, tasks: list[Callable[[], T]], interleave: bool = True) -> list[T]:
        """Run every task in turns until all are done (or one after the other without `interleave`, where `wait`
        returns at once); results in task order. An error in a task is raised here."""
        if not interleave:
            results = []
            for i, task in enumerate(tasks):
                self.current = i
                results.append(task())
            return results
        self.scheduler = getcurrent()
        lets = [greenlet(task) for task in tasks]
        results: list = [None] * len(tasks)
        alive = list(range(len(tasks)))
        try:
            while alive:
                paused = []
                for i in alive:
                    self.current = i
                    out = lets[i].switch()
                    if lets[i].dead:
                        results[i] = out
                    else:
                        paused.append(i)
                alive = paused
        finally:
            self.scheduler = None
        return results
