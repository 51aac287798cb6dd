"""A remote job's staging folder on its node: locked while its task lives, removed by the next task there once the
task died (however it died), never while it lives, and a folder without the lock is never touched. Real processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from backend.runs.remote import clear_left_staging, staging_folder
from tests.conftest import ROOT


def test_a_killed_tasks_staging_is_cleared_by_the_next_and_a_live_ones_is_not(tmp_path):
    task = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from backend.runs.remote import staging_folder
        folder, lock = staging_folder(Path({str(tmp_path)!r}))
        (folder / "run" / "model").mkdir(parents=True)
        (folder / "run" / "model" / "model.safetensors").write_bytes(bytes(4096))
        print(folder, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        staged = Path(task.stdout.readline().strip())
        ours, lock = staging_folder(tmp_path)
        foreign = tmp_path / "prunescope-staging-not-a-task"
        foreign.mkdir()
        assert staged.is_dir() and clear_left_staging(tmp_path) == []
    finally:
        task.kill()
        task.wait()
        task.stdout.close()
    assert clear_left_staging(tmp_path) == [staged]
    assert not staged.exists() and ours.is_dir() and foreign.is_dir()
    lock.close()
    assert clear_left_staging(tmp_path) == [ours] and foreign.is_dir()
