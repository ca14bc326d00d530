"""The run report displays in a real browser: headless Chromium (Debian's `chromium` package) loads
it, every plot decodes as an image, no script error fires, and a screenshot has content."""

import os
import shutil
import subprocess

import pytest

from tailorlm.report import write_report

from ..unit.test_report import _fake_run

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    # CI installs it (`make test` does, as root) and sets TAILORLM_REQUIRE_CHROMIUM, so there this fails
    if os.environ.get("TAILORLM_REQUIRE_CHROMIUM"):
        raise RuntimeError("chromium not found; install Debian's chromium package (make test does, as root)")
    pytest.skip("chromium is not installed", allow_module_level=True)

# Flags for a closed network and a root user: no sandbox, no background connections to Google
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",
]

# Appended to a copy of the page: after load, record image decoding and script errors in the DOM
PROBE = """<script>
var errors = [];
window.addEventListener("error", function (e) { errors.push(String(e.message || e.type)); }, true);
window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = "images=" + imgs.length + " broken=" + bad + " sections=" +
    document.querySelectorAll("h2").length + " errors=" + errors.length + " " + errors.join("|");
  document.body.appendChild(out);
});
</script>"""


def _chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_renders_in_headless_chromium(tmp_path):
    run = _fake_run(tmp_path)
    page = write_report(str(run))
    probed = tmp_path / "probed.html"
    probed.write_text(open(page).read().replace("</body>", PROBE + "</body>"))

    dom = _chromium(tmp_path, "--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    probe = dom.stdout.split('<pre id="probe">')[1].split("</pre>")[0]
    fields = dict(kv.split("=", 1) for kv in probe.split()[:4])
    assert int(fields["images"]) >= 2 and fields["broken"] == "0", probe
    assert fields["sections"] == "4" and fields["errors"] == "0", probe

    shot = tmp_path / "report.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", f"file://{page}")
    assert res.returncode == 0 and shot.stat().st_size > 20_000, res.stderr[-2000:]
