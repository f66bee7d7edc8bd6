"""The web UIs in a real browser: headless Chromium against the Dagster webserver and the MLflow
tracking server, each started on loopback for the test.

How the browser is driven: Debian's ``chromium`` (CI installs it in ``.ci/run``) is run once per
page as ``chromium --headless=new ... --virtual-time-budget=N --screenshot=X.png --dump-dom URL``.
Both single-page apps fetch their data after the first paint; with a virtual-time budget Chromium
keeps the page's clock stopped while requests are pending and only dumps the DOM and takes the
screenshot once the budget has run out on an idle page, so a slow server on a loaded machine
delays the result instead of giving an empty page. The DOM and the screenshot come from the same
page load. No WebDriver and no Python package beyond the project's (PIL checks the PNG).

Routes (Dagster 1.13, MLflow 3.17):
- Dagster: ``/asset-groups`` is the global asset lineage graph ("Lineage" in the navigation).
  With more than one asset group it draws each group as one collapsed box; the query parameter
  ``expanded=<group id>,...`` (the state behind "Expand all groups", group id
  ``global@global:<group>`` or ``<repository>@<location>:<group>`` when the per-location flag is
  on) opens them, so every asset is a node. Asset nodes are HTML inside SVG ``<foreignObject>``
  elements: the test looks for the names there, not in the sidebar.
- MLflow: ``#/experiments/<id>`` opens the GenAI overview in MLflow 3; the runs table is
  ``#/experiments/<id>/runs`` and one run is ``#/experiments/<id>/runs/<run_id>``.

Chromium runs as root here, hence ``--no-sandbox``; without ``--disable-background-networking``
and friends it keeps trying to reach Google on this closed network. The instance's
``dagster.yaml`` turns telemetry and the first-visit "Join the Dagster community" dialog off (the
dialog would cover the graph in the screenshot).

The tests skip when ``/usr/bin/chromium`` is absent; with ``MMREC_REQUIRE_BROWSER=1`` in the
environment (meant for CI, where ``.ci/run`` installs Chromium) they fail instead.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import REPO

CHROMIUM = Path(os.environ.get("MMREC_CHROMIUM", "/usr/bin/chromium"))
VENV_BIN = Path(sys.executable).parent
ASSETS = ["raw_catalog", "validated_catalog", "item_features", "pretrained_model", "finetuned_model",
          "evaluation", "served_model"]
"""The asset graph of ``orchestration/definitions.py`` (issue 4)."""
WINDOW = (1600, 1000)
SERVER_START_S = 90.0
"""Start-up allowance for a server on a loaded 2-core machine (MLflow needs ~10-30 s, Dagster ~10 s)."""
PAGE_S = 60.0
"""How long to keep reloading a page until the expected content is there."""


def _browser_missing() -> str | None:
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return None
    reason = (f"{CHROMIUM} not found: install Debian's chromium (CI does, in .ci/run) to run the real browser "
              "tests of the Dagster and MLflow UIs")
    if os.environ.get("MMREC_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + " (MMREC_REQUIRE_BROWSER=1: failing instead of skipping)")
    return reason


@pytest.fixture
def chromium() -> Path:
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    return CHROMIUM


# --------------------------------------------------------------------------------------------
# Servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DAGSTER_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Server:
    """A server subprocess in its own process group (so its workers end with it), logging to a file."""

    def __init__(self, name: str, cmd: list[str], log: Path, port: int, **popen):
        self.name, self.cmd, self.log, self.port = name, cmd, log, port
        self.url = f"http://127.0.0.1:{port}"
        self._log_fh = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, **popen)

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.proc.returncode} ({' '.join(self.cmd)}):\n{self.log_tail()}")

    def wait_until(self, ready, what: str, timeout: float = SERVER_START_S):
        """Poll ``ready()`` (returns a truthy value, or raises/returns falsy while not ready)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                value = ready()
                if value:
                    return value
            except (OSError, urllib.error.URLError, ValueError) as exc:  # not listening yet, 5xx while loading
                last = exc
            time.sleep(0.5)
        pytest.fail(f"{self.name} did not get {what} within {timeout:.0f} s (last error: {last!r}):\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:  # the leader is gone; its workers may not be
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log_fh.close()


def http_get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode("utf-8", errors="replace")


def http_post_json(url: str, payload: dict, timeout: float = 30) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8"))


# --------------------------------------------------------------------------------------------
# The browser

class Page(HTMLParser):
    """What a dumped DOM shows: the visible text (no script/style/template) and, separately, the
    text inside SVG ``<foreignObject>`` elements (the nodes of Dagster's graph)."""

    _HIDDEN = {"script", "style", "noscript", "template", "title"}

    def __init__(self, dom: str):
        super().__init__(convert_charrefs=True)
        self.dom = dom
        self.title = ""
        self._stack: list[str] = []
        self.texts: list[str] = []
        self.svg_html_texts: list[str] = []
        self.feed(dom)
        self.close()
        self.text = " ".join(self.texts)

    def handle_starttag(self, tag, attrs):
        if tag not in {"br", "img", "input", "meta", "link", "hr", "source", "wbr", "area", "col", "embed"}:
            self._stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self._stack:
            while self._stack and self._stack.pop() != tag:
                pass

    def handle_data(self, data):
        data = data.strip()
        if not data:
            return
        if "title" in self._stack and not self.title:
            self.title = data
        if self._HIDDEN.intersection(self._stack):
            return
        self.texts.append(data)
        if "foreignobject" in self._stack:
            self.svg_html_texts.append(data)


def chromium_args(profile: Path, screenshot: Path, budget_ms: int) -> list[str]:
    return [str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-quic", "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps",
            "--mute-audio", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--virtual-time-budget={budget_ms}",
            f"--screenshot={screenshot}", "--dump-dom"]


def render(url: str, screenshot: Path, budget_ms: int = 15000, timeout: float = 90) -> Page:
    """Load ``url`` in a fresh headless Chromium; the rendered DOM after ``budget_ms`` of virtual
    time (see the module docstring), with the screenshot of the same moment saved to ``screenshot``."""
    profile = screenshot.parent / f".chromium-profile-{screenshot.stem}"
    shutil.rmtree(profile, ignore_errors=True)
    profile.mkdir(parents=True)
    screenshot.unlink(missing_ok=True)
    # its own process group: on a time-out the renderer and helper processes go with it
    proc = subprocess.Popen([*chromium_args(profile, screenshot, budget_ms), url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "HOME": str(profile)})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish {url} within {timeout:.0f} s")
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if proc.returncode != 0 or not out.strip():
        pytest.fail(f"chromium failed on {url} (exit {proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    return Page(out.decode("utf-8", errors="replace"))


def render_until(url: str, screenshot: Path, ok, what: str, timeout: float = PAGE_S,
                 server: Server | None = None) -> Page:
    """``render`` again (the app may still be loading its data) until ``ok(page)`` holds; the DOM of
    each try is kept next to the screenshot for a failure's post-mortem."""
    deadline = time.monotonic() + timeout
    tries = 0
    while True:
        tries += 1
        t0 = time.monotonic()
        page = render(url, screenshot, budget_ms=15000 if tries == 1 else 25000)
        screenshot.with_suffix(".html").write_text(page.dom, encoding="utf-8")
        print(f"rendered {url} in {time.monotonic() - t0:.1f} s (try {tries}): {screenshot}")
        if ok(page):
            return page
        if server is not None:
            server.check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not on {url} after {tries} tries ({timeout:.0f} s); page title {page.title!r}, "
                        f"text: {page.text[:1500]!r}; DOM saved as {screenshot.with_suffix('.html')}"
                        + (f"\nserver log:\n{server.log_tail()}" if server else ""))
        time.sleep(2)


def check_screenshot(path: Path) -> None:
    """A real rendering: a PNG of the window's size, not tiny, not one flat colour."""
    from PIL import Image

    assert path.is_file(), f"no screenshot at {path}"
    size = path.stat().st_size
    assert size > 10_000, f"screenshot {path} is only {size} bytes"
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == WINDOW, f"screenshot {path} is {im.size}, expected {WINDOW}"
        colors = im.convert("RGB").getcolors(maxcolors=WINDOW[0] * WINDOW[1])
    assert len(colors) >= 50, f"screenshot {path} has only {len(colors)} colours"
    dominant = max(n for n, _ in colors) / (WINDOW[0] * WINDOW[1])
    assert dominant < 0.985, f"screenshot {path} is {100 * dominant:.1f}% one colour: a blank page?"


# --------------------------------------------------------------------------------------------
# MLflow

RUN_NAME = "finetuned_model[films]"
PARAMS = {"lr": 0.001, "epochs": 3, "item_tower": "mm_fusion"}


@pytest.fixture
def mlflow_ui(chromium, tmp_path):
    """A sqlite store with one finished run in experiment ``mmrec``, served by ``mlflow server``."""
    from orchestration import mlflow_support as ms

    t0 = time.monotonic()
    uri = ms.default_tracking_uri(tmp_path / "store")
    exp_id = ms.ensure_experiment(uri, "mmrec")
    with ms.mlflow_run(uri, "mmrec", RUN_NAME, {"domain": "films", "git_commit": "0" * 40}) as tracker:
        tracker.log_params(PARAMS)
        for epoch in range(3):
            tracker.log_metrics({"train/loss": 1.0 / (epoch + 1), "val/NDCG@10": 0.1 * (epoch + 1)}, step=epoch)
        run_id = tracker.run_id
    print(f"store with one run: {time.monotonic() - t0:.1f} s")

    mlflow = VENV_BIN / "mlflow"
    port = free_port()
    cmd = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--backend-store-uri", uri,
           "--artifacts-destination", str(tmp_path / "store" / "mlflow" / "served-artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = Server("mlflow server", cmd, tmp_path / "mlflow-server.log", port, cwd=tmp_path, env=server_env())
    try:
        t0 = time.monotonic()
        server.wait_until(lambda: http_get(f"{server.url}/health").strip() == "OK", "/health answering OK")
        server.wait_until(lambda: RUN_NAME in http_get(
            f"{server.url}/api/2.0/mlflow/runs/get?run_id={run_id}"), "the run through its REST API")
        print(f"mlflow server up in {time.monotonic() - t0:.1f} s at {server.url}")
        yield server, exp_id, run_id
    finally:
        server.stop()


def test_mlflow_ui_shows_the_run(mlflow_ui, tmp_path):
    server, exp_id, run_id = mlflow_ui
    shots = tmp_path / "screenshots"
    shots.mkdir()

    runs_url = f"{server.url}/#/experiments/{exp_id}/runs"
    page = render_until(runs_url, shots / "mlflow_runs.png", lambda p: RUN_NAME in p.text,
                        f"run {RUN_NAME!r}", server=server)
    check_screenshot(shots / "mlflow_runs.png")
    assert "mmrec" in page.text  # the experiment's name

    run_url = f"{server.url}/#/experiments/{exp_id}/runs/{run_id}"
    expected = [RUN_NAME, run_id, "val/NDCG_at_10", "train/loss", *PARAMS, "films"]
    page = render_until(run_url, shots / "mlflow_run.png", lambda p: all(s in p.text for s in expected),
                        f"the run's name, id, params, metrics and tags {expected}", server=server)
    check_screenshot(shots / "mlflow_run.png")
    assert "Finished" in page.text or "FINISHED" in page.text
    print(f"screenshots: {shots / 'mlflow_runs.png'} {shots / 'mlflow_run.png'}")


# --------------------------------------------------------------------------------------------
# Dagster

DAGSTER_YAML = "telemetry:\n  enabled: false\nnux:\n  enabled: false\n"

ASSET_QUERY = """{
  workspaceOrError {
    __typename
    ... on Workspace { locationEntries { name loadStatus
        locationOrLoadError { __typename ... on PythonError { message stack causes { message stack } } } } }
    ... on PythonError { message }
  }
  assetNodes { assetKey { path } groupName repository { name location { name } } }
}"""


def start_dagster_webserver(target: list[str], home: Path, log: Path, cwd: Path, env: dict | None = None) -> Server:
    """``dagster-webserver <target> -h 127.0.0.1 -p <free port>`` with ``DAGSTER_HOME=home`` (created,
    with a ``dagster.yaml`` that turns telemetry and the welcome dialog off)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(DAGSTER_YAML, encoding="utf-8")
    exe = VENV_BIN / "dagster-webserver"
    port = free_port()
    cmd = [str(exe) if exe.exists() else "dagster-webserver", *target, "-d", str(cwd), "-h", "127.0.0.1",
           "-p", str(port)]
    pythonpath = os.pathsep.join(p for p in (str(cwd), os.environ.get("PYTHONPATH")) if p)
    return Server("dagster-webserver", cmd, log, port, cwd=cwd,
                  env=server_env(DAGSTER_HOME=str(home), PYTHONPATH=pythonpath, **(env or {})))


def wait_for_assets(server: Server, names: list[str]) -> list[dict]:
    """Wait until the webserver answers and its code location has loaded with ``names`` among its
    assets (fail at once with the error when the location fails to load); returns the asset nodes."""
    server.wait_until(lambda: "dagster_webserver_version" in http_get(f"{server.url}/server_info"), "/server_info")

    def loaded():
        data = http_post_json(f"{server.url}/graphql", {"query": ASSET_QUERY}).get("data") or {}
        ws = data.get("workspaceOrError") or {}
        if ws.get("__typename") == "PythonError":
            pytest.fail(f"the Dagster workspace failed: {ws.get('message')}")
        entries = ws.get("locationEntries") or []
        for entry in entries:
            err = entry.get("locationOrLoadError") or {}
            if err.get("__typename") == "PythonError":
                root = (err.get("causes") or [err])[-1]  # the user's exception, not Dagster's wrapper
                stack = "".join(root.get("stack") or [])[-3000:]
                pytest.fail(f"code location {entry['name']} failed to load: {err.get('message')}\n"
                            f"caused by: {root.get('message')}\n{stack}")
        if not entries or any(e.get("loadStatus") != "LOADED" for e in entries):
            return None
        nodes = data.get("assetNodes") or []
        have = {n["assetKey"]["path"][-1] for n in nodes}
        missing = [n for n in names if n not in have]
        if missing:
            pytest.fail(f"the code location loaded without assets {missing} (it has {sorted(have)})")
        return nodes

    return server.wait_until(loaded, "its code location loaded")


def lineage_url(server: Server, nodes: list[dict]) -> str:
    """The global asset graph with every group expanded (see the module docstring)."""
    ids = []
    for n in nodes:
        group, repo = n.get("groupName") or "default", n["repository"]
        for gid in (f"global@global:{group}", f"{repo['name']}@{repo['location']['name']}:{group}"):
            if gid not in ids:
                ids.append(gid)
    return f"{server.url}/asset-groups?expanded={','.join(ids)}"


def graph_nodes_shown(page: Page, names: list[str]) -> list[str]:
    """The ``names`` drawn as nodes of the graph (a node's label is the asset key, ``a/b/name``)."""
    labels = set(page.svg_html_texts)
    return [n for n in names if any(lbl == n or lbl.endswith("/" + n) for lbl in labels)]


def check_asset_graph(server: Server, names: list[str], screenshot: Path) -> Page:
    t0 = time.monotonic()
    nodes = wait_for_assets(server, names)
    print(f"dagster-webserver up with its code location loaded in {time.monotonic() - t0:.1f} s at {server.url}")
    url = lineage_url(server, nodes)
    page = render_until(url, screenshot, lambda p: graph_nodes_shown(p, names) == names,
                        f"graph nodes for all of {names}", server=server)
    check_screenshot(screenshot)
    assert "Global asset lineage" in page.text
    assert all(n in page.text for n in names)
    print(f"screenshot: {screenshot}")
    return page


@pytest.fixture
def dagster_ui(chromium, tmp_path):
    """``dagster-webserver -m orchestration.definitions`` on loopback, for the project's config."""
    server = start_dagster_webserver(["-m", "orchestration.definitions"], tmp_path / "dagster_home",
                                     tmp_path / "dagster-webserver.log", cwd=REPO)
    try:
        yield server
    finally:
        server.stop()


def test_dagster_ui_shows_the_asset_graph(dagster_ui, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    check_asset_graph(dagster_ui, ASSETS, shots / "dagster_asset_graph.png")
