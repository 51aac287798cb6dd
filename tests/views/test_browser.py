"""End to end in a real browser: the dashboard as its own process on a fresh store, driven by Debian's Chromium
through Playwright. Submit a tiny run on the Run page, wait for it to finish, then open Compare, Layers and
Generations; and Home's demo from an empty store, timed, then every page. Every page renders without an exception
and with its charts. Screenshots of each page are saved into $PRUNESCOPE_ARTIFACTS (the demo's into
$PRUNESCOPE_SCREENSHOTS, e.g. docs/screenshots), else artifacts/screenshots/."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlparse

import pytest

from backend.runs.worker import stop_worker
from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IDLE = '[data-testid=stApp][data-test-connection-state=CONNECTED][data-test-script-state=notRunning]'
PLOTLY = "[data-testid=stPlotlyChart] .js-plotly-plot"
EXCEPTION = "[data-testid=stException]"
RUN_TIMEOUT_S = 120

if not os.environ.get("CI"):
    if not CHROMIUM.is_file():
        pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install -y chromium); the browser "
                    "test runs only where it is, and always in CI", allow_module_level=True)
    pytest.importorskip("playwright", reason="Python playwright is not installed (pip install -r requirements-dev.txt)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("PRUNESCOPE_ARTIFACTS") or ROOT / "artifacts" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def app_server(tmp_path):
    """`streamlit run app.py` on a free local port with a fresh empty store and model cache, offline as a new user
    with no internet would be; yields (base url, store folder)."""
    store = tmp_path / "store"
    port = free_port()
    env = {**os.environ, "PRUNESCOPE_STORE": str(store), "PRUNESCOPE_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1"}
    env.pop("PRUNESCOPE_DATA_DIR", None)
    log_path = tmp_path / "streamlit.log"
    log = open(log_path, "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                pytest.fail(f"streamlit exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as answer:
                    if answer.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not answer /_stcore/health in 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base, store
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        log.close()
        stop_worker(store)
        worker_log = store / "worker.log"
        if worker_log.is_file():
            shutil.copy(worker_log, tmp_path / "worker-copy.log")


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright
    if not CHROMIUM.is_file():
        pytest.fail(f"CI is set but Debian's Chromium is missing at {CHROMIUM}: .ci/run must apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2200})
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            yield page, errors
        finally:
            browser.close()


def wait_idle(page, heading: str | None = None) -> None:
    """The page's title (containing `heading`, when given) is shown and the script has finished its run."""
    title = page.locator("[data-testid=stMain] h1")
    (title.filter(has_text=heading) if heading else title).first.wait_for(state="visible")
    page.wait_for_selector(IDLE, state="attached")


def assert_no_exception(page, name: str) -> None:
    errors = page.locator(EXCEPTION)
    assert errors.count() == 0, f"{name} page shows an exception:\n" + "\n---\n".join(errors.all_inner_texts())


def shoot(page, folder: Path, name: str, shots: list[Path]) -> None:
    """A screenshot of the whole page: Streamlit scrolls inside its own container, so the viewport is grown to the
    content's height for the shot (full_page alone stops at the fold)."""
    path = folder / f"{name}.png"
    size = page.viewport_size
    height = page.evaluate("""() => Math.max(...['[data-testid=stMain]', '[data-testid=stAppViewContainer]', 'body']
        .map(s => document.querySelector(s)).filter(Boolean).map(e => e.scrollHeight))""")
    if height > size["height"]:
        page.set_viewport_size({"width": size["width"], "height": min(height + 50, 10_000)})
        page.wait_for_timeout(300)
    page.wait_for_function("() => !document.querySelector('[data-testid=stSkeleton], [data-stale=true]')",
                           timeout=10_000)
    page.wait_for_timeout(500)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(size)
    shots.append(path)


def choose(page, label: str, option: str) -> None:
    """Pick an option of a selectbox by its label, typing to filter so long lists need no scrolling."""
    box = page.get_by_role("combobox", name=label)
    box.click()
    page.keyboard.type(option)
    page.get_by_role("option", name=option, exact=True).click()


def number(page, label: str, value: int) -> None:
    field = page.get_by_label(label, exact=True)
    field.fill(str(value))
    field.press("Tab")


def main_text(page) -> str:
    return " ".join(page.locator("[data-testid=stMain]").inner_text().split())


@pytest.mark.timeout(420)
def test_submit_a_run_and_browse_every_page(tiny_folder, browser_page, app_server, capsys):
    base, store = app_server
    page, page_errors = browser_page
    folder, shots, steps = artifacts_dir(), [], []
    started = time.monotonic()

    def step(name: str) -> None:
        steps.append(f"{name} {time.monotonic() - started:.1f} s")

    page.goto(base + "/")
    wait_idle(page, "PruneScope")
    assert_no_exception(page, "Home")
    shoot(page, folder, "home", shots)
    step("home")

    page.goto(base + "/run")
    wait_idle(page, "Run")
    model = page.get_by_label("Model", exact=True)
    model.fill(str(tiny_folder))
    model.press("Tab")
    choose(page, "Method", "wanda")
    choose(page, "Calibration data", "demo-prose")
    number(page, "Samples", 4)
    number(page, "Sequence length", 64)
    choose(page, "Perplexity data", "demo-prose")
    choose(page, "JS divergence data", "demo")
    choose(page, "Task data", "demo")
    number(page, "Examples", 4)
    number(page, "Perplexity windows", 2)
    number(page, "Perplexity length", 64)
    number(page, "Max new tokens", 4)
    page.get_by_role("button", name="Prune and evaluate").click()
    step("submitted")

    page.wait_for_url(re.compile(r"[?&]run=[0-9a-f]+"))
    rid = parse_qs(urlparse(page.url).query)["run"][0]
    from backend.runs.store import Store
    db = Store(store)
    spec = db.spec(rid)
    db.close()
    evaluation = spec.evaluation
    assert (spec.model, spec.method, spec.calibration, spec.nsamples, spec.seqlen) == (
        str(tiny_folder), "wanda", "demo-prose", 4, 64), spec
    assert (evaluation.ppl, evaluation.jsd, evaluation.tasks, evaluation.limit, evaluation.ppl_windows,
            evaluation.ppl_seqlen, evaluation.max_new_tokens) == ("demo-prose", "demo", "demo", 4, 2, 64, 4), evaluation
    success = page.locator("[data-testid=stAlertContentSuccess]").filter(has_text=re.compile(r"^\s*Done"))
    failure = page.locator("[data-testid=stAlertContentError]")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not success.count():
        assert_no_exception(page, "Run")
        if failure.count():
            worker_log = store / "worker.log"
            pytest.fail(f"run {rid} did not finish: {failure.first.inner_text()}\n"
                        + (worker_log.read_text()[-3000:] if worker_log.is_file() else ""))
        assert time.monotonic() < deadline, f"run {rid} not done after {RUN_TIMEOUT_S} s: {main_text(page)[-500:]}"
        page.wait_for_timeout(250)
    page.wait_for_selector(IDLE, state="attached")
    assert_no_exception(page, "Run")
    step("done")
    shoot(page, folder, "run-done", shots)

    links = {}
    for target in ("compare", "layers", "generations"):
        link = page.locator(f'[data-testid=stPageLink-NavLink][href*="{target}"]').first
        link.wait_for(state="visible")
        links[target] = urljoin(page.url, link.get_attribute("href"))
    for target in ("layers", "generations"):
        assert f"run={rid}" in links[target], f"the Run page's link to {target} does not carry the run: {links[target]}"

    for target in ("compare", "layers"):
        page.goto(links[target] if "run=" in links[target] else f"{links[target]}?run={rid}")
        wait_idle(page)
        page.locator(PLOTLY).first.wait_for(state="visible", timeout=20_000)
        assert_no_exception(page, target)
        shoot(page, folder, target, shots)
        step(target)

    db = Store(store)
    examples = db.examples(rid, "task")
    db.close()
    assert len(examples) == 4, f"run {rid} stored {len(examples)} task examples, not 4"
    wanted = {" ".join(e[key].split()) for e in examples for key in ("instruction", "input") if e.get(key)}
    page.goto(links["generations"])
    wait_idle(page)
    deadline = time.monotonic() + 20
    while missing := [text for text in wanted if text not in main_text(page)]:
        assert time.monotonic() < deadline, (f"the Generations page lacks the run's task examples {missing}; it shows: "
                                             + main_text(page)[:800])
        page.wait_for_timeout(250)
    assert_no_exception(page, "Generations")
    shoot(page, folder, "generations", shots)
    step("generations")

    page.goto(base + "/findings")
    wait_idle(page, "Findings")
    verdicts = page.locator("[data-testid=stAlert]").filter(has_text=re.compile(r"^\s*Verdict: "))
    verdicts.nth(2).wait_for(state="visible")
    texts = [" ".join(t.split()) for t in verdicts.all_inner_texts()]
    assert len(texts) == 3 and all(t in ("Verdict: held", "Verdict: not held", "Verdict: inconclusive")
                                   for t in texts), texts
    page.get_by_role("button", name=re.compile(r"Queue the \d+ missing run")).wait_for(state="visible")
    assert main_text(page).count("Rule.") == 3
    assert_no_exception(page, "Findings")
    shoot(page, folder, "findings", shots)
    step("findings")

    with capsys.disabled():
        print(f"\nbrowser test, run {rid}, seconds after the app was up: {', '.join(steps)}; "
              f"page errors: {page_errors or 'none'}; screenshots:")
        for path in shots:
            print(f"  {path}")


PAGES = ("run", "runs", "compare", "findings", "layers", "generations")


@pytest.mark.timeout(600)
def test_the_demo_from_an_empty_store_and_every_page(browser_page, app_server, capsys):
    """Home's demo button on an empty store, with a fresh model cache (the embedded model's conversion included)
    and no data folder: wait for it to finish, watching the overall bar only grow, then open every page."""
    base, store = app_server
    page, page_errors = browser_page
    folder = Path(os.environ.get("PRUNESCOPE_SCREENSHOTS") or artifacts_dir())
    folder.mkdir(parents=True, exist_ok=True)
    shots: list[Path] = []
    page.goto(base + "/")
    wait_idle(page, "PruneScope")
    assert "ship with PruneScope" in main_text(page)
    clicked = time.monotonic()
    page.get_by_role("button", name="Start the demo").click()
    page.wait_for_url(re.compile(r"/run\?run=[0-9a-f]+"))
    rid = parse_qs(urlparse(page.url).query)["run"][0]
    success = page.locator("[data-testid=stAlertContentSuccess]").filter(has_text=re.compile(r"^\s*Done"))
    failure = page.locator("[data-testid=stAlertContentError]")
    overall = page.get_by_role("progressbar").first
    fractions: list[float] = []
    while not success.count():
        assert_no_exception(page, "Run")
        if failure.count():
            worker_log = store / "worker.log"
            pytest.fail(f"the demo run {rid} failed: {failure.first.inner_text()}\n"
                        + (worker_log.read_text()[-3000:] if worker_log.is_file() else ""))
        assert time.monotonic() - clicked < 540, f"the demo is not done after 540 s: {main_text(page)[-500:]}"
        try:
            if overall.count():
                fractions.append(float(overall.get_attribute("aria-valuenow", timeout=1000) or 0))
        except Exception:  # noqa: BLE001  (the fragment re-rendered between the count and the read)
            pass
        page.wait_for_timeout(250)
    wall = time.monotonic() - clicked
    page.wait_for_selector(IDLE, state="attached")
    assert fractions and max(fractions) > 0, "the overall progress bar never moved"
    assert fractions == sorted(fractions), f"the overall progress went backwards: {fractions}"
    shoot(page, folder, "run", shots)

    page.goto(base + "/")
    wait_idle(page, "PruneScope")
    assert f"demo run {rid[:8]} is finished" in main_text(page)
    answers = page.locator(f'[data-testid=stPageLink-NavLink][href*="generations?run={rid}"]')
    answers.first.wait_for(state="visible")  # the link can render a moment after the sentence
    assert answers.count() == 1
    assert_no_exception(page, "Home")
    shoot(page, folder, "home", shots)
    for name in PAGES[1:]:
        page.goto(f"{base}/{name}?run={rid}")
        wait_idle(page)
        if name in ("compare", "layers"):
            page.locator(PLOTLY).first.wait_for(state="visible", timeout=20_000)
        assert_no_exception(page, name)
        assert "<|im_end|>" not in main_text(page), f"the {name} page shows a raw special token"
        shoot(page, folder, name, shots)
    with capsys.disabled():
        print(f"\ndemo run {rid}: {wall:.1f} s from the click to Done (fresh model cache, no data folder); "
              f"{len(fractions)} readings of the overall bar, last {fractions[-1]:.2f}; page errors: "
              f"{page_errors or 'none'}; screenshots in {folder}")
