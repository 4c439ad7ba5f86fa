"""A headless JupyterLab driven by Playwright and the system Chromium: start a server on a folder of
notebooks, open one, run it, find ipywidgets by their description, read the plotly figures a widget shows
and time how long an interaction takes to change them. Shared by tests/test_browser.py and
benchmarks/widget_latency.py."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

VIEWPORT = {"width": 1400, "height": 1000}
POLL_MS = 50  # how often the page is polled for a changed figure: the resolution of the latencies

# Isolated settings: no news or update checks (no network in CI, and no toast over the notebook), and every
# cell kept rendered (no windowing), so a figure below the fold is drawn like one in view.
SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}

# ipywidgets 8 classes of the controls the notebooks use, by the widget kind the tests name.
KINDS = {"dropdown": ".widget-dropdown", "select-multiple": ".widget-select-multiple", "slider": ".widget-slider"}

# The current notebook panel and its kernel, through the app exposed by --LabApp.expose_app_in_browser.
_PANEL = "(() => { const w = window.jupyterapp.shell.currentWidget; return w && w.sessionContext ? w : null; })()"
_KERNEL_IDLE = f"""() => {{
  const p = {_PANEL};
  const k = p && p.sessionContext.session && p.sessionContext.session.kernel;
  return !!k && k.status === 'idle' && k.connectionStatus === 'connected';
}}"""

# Everything a figure shows, reduced to a short string: trace types and names, the title, and a hash of
# the data (typed arrays as lists), so that a restyle of colours or a new image changes it.
_SIGNATURE = """(scope) => {
  const hash = (s) => { let h = 2166136261; for (let i = 0; i < s.length; i++) { h ^= s.charCodeAt(i);
    h = Math.imul(h, 16777619); } return (h >>> 0).toString(16); };
  const plain = (k, v) => ArrayBuffer.isView(v) ? Array.from(v) : v;
  const root = document.querySelector(scope);
  if (!root) return null;
  const figs = [...root.querySelectorAll('.js-plotly-plot')].filter((el) => Array.isArray(el.data));
  return JSON.stringify(figs.map((el) => {
    const t = el.layout && el.layout.title;
    return {title: t && (t.text !== undefined ? t.text : t) || '',
            traces: el.data.map((d) => `${d.type || 'scatter'}:${d.name || ''}`),
            data: hash(JSON.stringify(el.data, plain))};
  }));
}"""

# Polled after an interaction: the figure's last change (ms after the last input) once it differs from
# `before` and has held still for `quiet` ms; false until then. A cleared output ('[]') is not a change.
_SETTLED_CHANGE = f"""([scope, before, quiet]) => {{
  const s = ({_SIGNATURE})(scope), now = performance.now();
  const w = window.__watch || (window.__watch = {{sig: before, at: null}});
  if (s && s !== '[]' && s !== w.sig) {{ w.sig = s; w.at = now; }}
  if (w.sig === before || window.__lastInput === null || now - w.at < quiet) return false;
  return Math.max(w.at - window.__lastInput, 1e-3);
}}"""

# Error outputs anywhere in the notebook, and stderr that carries a traceback (warnings are fine).
_ERRORS = """() => [...document.querySelectorAll(
    '.jp-Notebook .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"],' +
    '.jp-Notebook .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
  .filter((el) => el.dataset.mimeType.endsWith('error') || /Traceback/.test(el.innerText))
  .map((el) => el.innerText.slice(0, 2000))"""


# When the user last acted (Notebook.changed times from it): capture phase, so a widget cannot hide it.
_MARK_INPUTS = """() => { for (const type of ['input', 'change', 'keydown']) {
  document.addEventListener(type, () => { window.__lastInput = performance.now(); }, {capture: true}); } }"""


# Errors the kernel reports outside any cell: a widget callback (a comm message) that raises sends its
# traceback to JupyterLab's log console, not to the notebook, so the kernel's messages are watched too.
_WATCH_KERNEL = f"""() => {{
  window.__kernelErrors = [];
  const plain = (t) => t.replace(/\\x1b\\[[0-9;]*m/g, '');
  const watch = (k) => k && k.iopubMessage.connect((_, m) => {{
    if (!m.parent_header || m.parent_header.msg_type !== 'comm_msg') return;
    const c = m.content, t = m.header.msg_type;
    if (t === 'error') window.__kernelErrors.push(plain(c.traceback.join('\\n')));
    if (t === 'stream' && c.name === 'stderr' && /Traceback/.test(c.text)) window.__kernelErrors.push(plain(c.text));
  }});
  const p = {_PANEL};
  watch(p.sessionContext.session && p.sessionContext.session.kernel);
  p.sessionContext.kernelChanged.connect((_, change) => watch(change.newValue));
}}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str | None:
    """The system Chromium (Playwright's own download is not used)."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def prepare(notebook: Path, out: Path, **parameters) -> Path:
    """Copy a notebook with its parameters cell set (papermill, not executed: the browser runs it)."""
    import papermill

    dst = out / notebook.name
    papermill.execute_notebook(
        str(notebook), str(dst), parameters=parameters, prepare_only=True, kernel_name="python3", progress_bar=False
    )
    return dst


class Lab:
    """A JupyterLab server as a subprocess on `root`, with its config, settings, workspaces and runtime
    files under `home`, so nothing of the user's setup leaks in. Its kernels get this process's
    environment (PYTHONPATH included: that is how another checkout's studylib is measured)."""

    def __init__(self, root: Path, home: Path):
        self.root, self.home = Path(root), Path(home)
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.home / "lab.log"

    def _env(self) -> dict[str, str]:
        dirs = {
            "JUPYTER_CONFIG_DIR": "config",
            "JUPYTERLAB_SETTINGS_DIR": "settings",
            "JUPYTERLAB_WORKSPACES_DIR": "workspaces",
            "JUPYTER_RUNTIME_DIR": "runtime",
        }
        env = {**os.environ, **{k: str(self.home / v) for k, v in dirs.items()}}
        for name, value in SETTINGS.items():
            path = self.home / "settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        return env

    def start(self, timeout: float = 120) -> Lab:
        self.home.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={self.port}", "--ip=127.0.0.1",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
            "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly",
            "--ServerApp.terminals_enabled=False",
        ] + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, env=self._env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({self.proc.returncode}):\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url("/api/status"), timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"JupyterLab did not answer in {timeout:.0f} s:\n{self.log()}")

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"http://127.0.0.1:{self.port}{path}{sep}token={self.token}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextmanager
def browser(headless: bool = True):
    """Playwright's sync API on the system Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), headless=headless, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


class WidgetStuck(AssertionError):
    """An interaction did not change the figure in time."""


@dataclass
class Notebook:
    """One notebook open in its own page of a Lab."""

    page: object
    name: str
    latencies: list[tuple[str, float]] = field(default_factory=list)

    @classmethod
    def open(cls, lab: Lab, context, name: str, timeout: float = 120) -> Notebook:
        page = context.new_page()
        page.set_default_timeout(30_000)
        # ?reset: start from an empty workspace, so notebooks opened earlier do not come back
        page.goto(lab.url(f"/lab/tree/{name}?reset"))
        nb = cls(page, name)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=timeout * 1000)
        page.evaluate("() => window.jupyterapp.shell.collapseLeft()")  # room for the figures
        page.evaluate(_MARK_INPUTS)
        nb.wait_idle(timeout)
        page.evaluate(_WATCH_KERNEL)
        return nb

    def wait_idle(self, timeout: float = 120) -> None:
        self.page.wait_for_function(_KERNEL_IDLE, timeout=timeout * 1000, polling=200)

    def run_all(self, timeout: float = 600) -> None:
        """Run every cell and wait for the last one (the notebook stops at an error, which errors() sees)."""
        self.start_all()
        self.wait_all(timeout)

    def start_all(self) -> None:
        """Start running every cell; wait_all() waits (so several notebooks can run side by side)."""
        self.page.evaluate(
            """() => { window.__runAll = null;
              window.jupyterapp.commands.execute('notebook:run-all-cells').then(
                (ok) => { window.__runAll = {ok}; }, (e) => { window.__runAll = {error: String(e)}; }); }"""
        )

    def wait_all(self, timeout: float = 600) -> None:
        done = self.page.wait_for_function("() => window.__runAll", timeout=timeout * 1000, polling=500).json_value()
        if "error" in done:
            raise RuntimeError(f"{self.name}: run all failed: {done['error']}")
        self.wait_idle(timeout)

    def execute(self, code: str, timeout: float = 60) -> str:
        """Run code in the notebook's kernel without adding a cell; returns what it printed, raises on a
        Python error."""
        reply = self.page.evaluate(
            f"""async (code) => {{ const k = {_PANEL}.sessionContext.session.kernel;
              const f = k.requestExecute({{code, store_history: false}});
              let out = '';
              f.onIOPub = (m) => {{ if (m.header.msg_type === 'stream') out += m.content.text; }};
              const r = (await f.done).content;
              return {{out, error: r.status === 'ok' ? null : `${{r.ename}}: ${{r.evalue}}`}}; }}""",
            code,
        )
        if reply["error"]:
            raise RuntimeError(f"{self.name}: {reply['error']}")
        self.wait_idle(timeout)
        return reply["out"]

    def errors(self) -> list[str]:
        """Error outputs in the notebook (and in its widgets' outputs), then tracebacks of widget callbacks
        that went to the log console."""
        shown = self.page.evaluate(_ERRORS)
        last = {e.strip().splitlines()[-1] for e in shown if e.strip()}
        hidden = self.page.evaluate("() => window.__kernelErrors || []")
        return shown + [e for e in hidden if e.strip() and e.strip().splitlines()[-1] not in last]

    # --- widgets

    def widget(self, kind: str, description: str):
        """The one ipywidget of this kind whose label reads exactly `description` (in any output of the
        notebook), scrolled into view."""
        sel = f'.jp-Notebook {KINDS[kind]}:has(> label.widget-label:text-is("{description}"))'
        loc = self.page.locator(sel)
        try:
            loc.first.wait_for(state="attached", timeout=30_000)
        except Exception as e:  # playwright's TimeoutError: say which widget is missing
            raise AssertionError(f"{self.name}: no {kind} widget labelled {description!r}") from e
        if loc.count() != 1:
            raise AssertionError(f"{self.name}: {loc.count()} {kind} widgets labelled {description!r}, expected 1")
        loc.scroll_into_view_if_needed()
        return loc

    def scope(self, description: str, kind: str = "dropdown") -> str:
        """A CSS selector for the cell whose widget has this control: its figures are the widget's."""
        self.widget(kind, description).evaluate("(el) => el.closest('.jp-Cell').setAttribute('data-under-test', '1')")
        return '.jp-Cell[data-under-test="1"]'

    def signature(self, scope: str) -> str | None:
        return self.page.evaluate(_SIGNATURE, scope)

    def wait_figure(self, scope: str, timeout: float = 120) -> str:
        """Wait until the scope shows at least one drawn plotly figure and stops changing."""
        self.page.wait_for_function(
            f"(scope) => {{ const s = ({_SIGNATURE})(scope); return s && s !== '[]'; }}",
            arg=scope,
            timeout=timeout * 1000,
            polling=POLL_MS,
        )
        return self.settle(scope, timeout)

    def settle(self, scope: str, timeout: float = 60, quiet: float = 0.5) -> str:
        """The signature once the kernel is idle and the figure has not changed for `quiet` seconds."""
        deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
        while time.monotonic() < deadline:
            self.wait_idle(timeout)
            now = self.signature(scope)
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return now
            time.sleep(0.1)
        return last

    def changed(self, label: str, scope: str, act, timeout: float, quiet: float = 0.5) -> float:
        """Do `act()`, then wait until the figure differs from before and has stopped changing for `quiet`
        seconds; returns the latency in seconds (and keeps it) or raises WidgetStuck naming `label`.

        The latency runs in the page's clock from the last input event (the select's change, the Enter
        or arrow key) to the last change of the figure, so Playwright's round trips do not count and a
        redraw in steps (cleared, then each figure) counts until it is whole; accurate to POLL_MS."""
        before = self.settle(scope)
        self.page.evaluate("() => { window.__lastInput = null; window.__watch = null; }")
        act()
        try:
            latency = self.page.wait_for_function(
                _SETTLED_CHANGE, arg=[scope, before, quiet * 1000], timeout=(timeout + quiet) * 1000, polling=POLL_MS
            ).json_value()
        except Exception as e:  # playwright's TimeoutError
            raise WidgetStuck(f"{self.name}: {label}: the figure did not change within {timeout:.0f} s") from e
        self.latencies.append((label, latency / 1000))
        self.wait_idle()
        return latency / 1000

    # --- interactions

    def choose(self, description: str, label: str) -> None:
        self.widget("dropdown", description).locator("select").select_option(label=label)

    def options(self, description: str, kind: str = "dropdown") -> list[str]:
        return self.widget(kind, description).locator("select option").all_inner_texts()

    def chosen(self, description: str, kind: str = "dropdown") -> list[str]:
        sel = self.widget(kind, description).locator("select")
        return sel.evaluate("(s) => [...s.selectedOptions].map((o) => o.textContent)")

    def pick_many(self, description: str, labels: list[str]) -> None:
        self.widget("select-multiple", description).locator("select").select_option(label=labels)

    def other(self, description: str) -> str:
        """The first option of a dropdown that is not the chosen one."""
        chosen = self.chosen(description)
        return next(o for o in self.options(description) if o not in chosen)

    def slide(self, description: str, value: int | None = None) -> None:
        """Move a slider: to `value` typed into its readout (+ Enter), or else one step with the arrow keys
        on its handle (down unless at its minimum: fewer images is quicker), the way a user nudges it."""
        slider = self.widget("slider", description)
        if value is not None:
            readout = slider.locator(".widget-readout")
            readout.fill(str(value))
            readout.press("Enter")
            return
        handle = slider.locator(".noUi-handle")
        now, low = (float(handle.get_attribute(a)) for a in ("aria-valuenow", "aria-valuemin"))
        handle.press("ArrowLeft" if now > low else "ArrowRight")

    def screenshot(self, path: Path, scope: str | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        target = self.page.locator(scope) if scope else self.page
        if scope:
            target.scroll_into_view_if_needed()
        target.screenshot(path=str(path))
        return path

    def close(self) -> None:
        """Shut the kernel down (frees its memory; at most 10 s) and close the page."""
        try:
            self.page.evaluate(
                f"""async () => {{ const p = {_PANEL}, late = new Promise((r) => setTimeout(r, 10000));
                  if (p) await Promise.race([p.sessionContext.shutdown(), late]); }}"""
            )
        finally:
            self.page.close()
