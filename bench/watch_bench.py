"""What watching a run in the browser costs the worker beside it: Home's demo started from the dashboard in headless
Chromium, once with the Run page left open on it (its progress polled every second, as a user watching it) and once
with the browser sent away after the click, alternating.

    python bench/watch_bench.py [--rounds 1] [--chromium /usr/bin/chromium] [--default-gc]

Each try starts the dashboard on a fresh store (offline, no data folder) with one model cache for all tries, so the
embedded model is converted once, before the first timed try. Printed per try: seconds from the click to the run's
end, and the CPU seconds of the worker, the Streamlit server, Chromium and Playwright meanwhile (summed over their
processes, from /proc); then the watched / unwatched ratio of the wall times. `--default-gc` adds a watched try with
Streamlit's default runner.postScriptGC (a full garbage collection after every script run, which
.streamlit/config.toml turns off). Figures only: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.runs.worker import stop_worker  # noqa: E402

KINDS = (("worker", ("backend", "worker")), ("streamlit", ("streamlit",)), ("chromium", ("chrom",)),
         ("playwright", ("playwright",)))


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """User + system CPU seconds of every process of a kind this bench tracks, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kind = next((name for name, words in KINDS if all(w in command for w in words)), None)
        if kind:
            found[int(pid)] = (kind, (int(fields[11]) + int(fields[12])) / tick)
    return found


def serve(store: Path, cache: Path, log: Path, options: list[str]) -> tuple[subprocess.Popen, str]:
    """`streamlit run app.py` on a free port with this store and model cache, offline, with these extra Streamlit
    options; returns it and its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PRUNESCOPE_STORE": str(store), "PRUNESCOPE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("PRUNESCOPE_DATA_DIR", None)
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                               *options],
                              cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as answer:
                if answer.read().strip() == b"ok":
                    return server, base
        except OSError:
            time.sleep(0.2)
    server.kill()
    sys.exit(f"the dashboard did not start: {log.read_text()[-2000:]}")


def finished(store: Path) -> bool:
    db = sqlite3.connect(store / "prunescope.db")
    try:
        return db.execute("SELECT COUNT(*) FROM jobs WHERE state NOT IN ('queued', 'running')").fetchone()[0] > 0
    finally:
        db.close()


def demo(browser, root: Path, cache: Path, watched: bool, options: list[str]) -> tuple[float, dict[str, float], str]:
    """Home's demo from a fresh store, watched on the Run page or not: wall seconds from the click to the end, CPU
    seconds per kind of process meanwhile, and the job's final state."""
    store = Path(tempfile.mkdtemp(dir=root))
    server, base = serve(store, cache, store.parent / f"{store.name}.log", options)
    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    page.set_default_timeout(120_000)
    try:
        page.goto(base + "/")
        page.get_by_role("button", name="Start the demo").wait_for(state="visible")
        before = cpu_seconds()
        clicked = time.monotonic()
        page.get_by_role("button", name="Start the demo").click()
        page.wait_for_url(re.compile(r"/run\?run=[0-9a-f]+"))
        if not watched:
            page.goto("about:blank")
        after = before
        while not finished(store):
            after = {**after, **cpu_seconds()}
            if watched:
                page.get_by_role("progressbar").count()
            time.sleep(0.5)
        wall = time.monotonic() - clicked
        after = {**after, **cpu_seconds()}
        spent: dict[str, float] = defaultdict(float)
        for pid, (kind, seconds) in after.items():
            spent[kind] += seconds - before.get(pid, (kind, 0.0))[1]
        db = sqlite3.connect(store / "prunescope.db")
        state = db.execute("SELECT state FROM jobs").fetchone()[0]
        db.close()
        return wall, dict(spent), state
    finally:
        page.close()
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        stop_worker(store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--default-gc", action="store_true", help="also a watched try with runner.postScriptGC on")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds} is not allowed: use at least 1")
    if not Path(args.chromium).is_file():
        parser.error(f"--chromium {args.chromium} is not a file: install Debian's chromium or pass its path")
    from playwright.sync_api import sync_playwright

    from backend.sources.models import ensure_embedded

    root = Path(tempfile.mkdtemp(prefix="watch-bench-"))
    cache = root / "cache"
    os.environ["PRUNESCOPE_CACHE"] = str(cache)
    started = time.perf_counter()
    ensure_embedded()
    print(f"embedded model converted into the bench's cache in {time.perf_counter() - started:.1f} s (not timed below)")
    tries = [("watched", True, []), ("unwatched", False, [])]
    if args.default_gc:
        tries.append(("watched, default GC", True, ["--runner.postScriptGC", "true"]))
    walls: dict[str, list[float]] = defaultdict(list)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium,
                                             args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            for round_ in range(1, args.rounds + 1):
                for name, watched, options in tries:
                    wall, spent, state = demo(browser, root, cache, watched, options)
                    walls[name].append(wall)
                    cpu = ", ".join(f"{kind} {spent.get(kind, 0.0):.1f}" for kind, _ in KINDS)
                    print(f"round {round_} {name:>19}: {wall:6.1f} s click to {state}; CPU seconds: {cpu}")
        finally:
            browser.close()
    mean = {name: sum(v) / len(v) for name, v in walls.items()}
    print(f"demo, mean of {args.rounds} round(s): " + ", ".join(f"{name} {m:.1f} s" for name, m in mean.items())
          + "; " + ", ".join(f"{name}/unwatched {m / mean['unwatched']:.2f}x" for name, m in mean.items()
                            if name != "unwatched"))


if __name__ == "__main__":
    main()
