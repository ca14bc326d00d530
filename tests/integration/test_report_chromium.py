"""The run report displays in a real browser: headless Chromium (Debian's `chromium` package) loads
it, every plot decodes as an image, the headline and the answer table's marks are there, no
script (a model answer's included) runs or errors, and a screenshot has content."""

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

# Put first in a copy of the page: a script smuggled in by a model answer that calls alert() says so
# (the real alert would block headless Chromium)
TRAP = "<script>window.alert = function () { window.alerted = true; };</script>"

# Appended to a copy of the page: after load, record image decoding and script errors in the DOM
PROBE = """<script>
var errors = [];
window.addEventListener("error", function (e) { errors.push(String(e.message || e.type)); }, true);
window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  var out = document.createElement("pre");
  out.id = "probe";
  var headline = document.querySelector("p.headline");
  out.textContent = "images=" + imgs.length + " broken=" + bad + " sections=" +
    document.querySelectorAll("h2").length + " marks=" + document.querySelectorAll("table.answers .mark").length +
    " scripts=" + document.scripts.length + " alerted=" + (window.alerted ? 1 : 0) +
    " errors=" + errors.length + " " + errors.join("|") + " | headline: " + (headline ? headline.textContent : "");
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
    probed.write_text(open(page).read().replace("<head>", "<head>" + TRAP).replace("</body>", PROBE + "</body>"))

    dom = _chromium(tmp_path, "--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    probe = dom.stdout.split('<pre id="probe">')[1].split("</pre>")[0]
    fields = dict(kv.split("=", 1) for kv in probe.split()[:7])
    assert int(fields["images"]) >= 2 and fields["broken"] == "0", probe
    assert fields["sections"] == "4" and fields["errors"] == "0", probe
    assert fields["marks"] == "4", probe  # two answer rows, a base and a finetuned mark each
    assert fields["scripts"] == "2" and fields["alerted"] == "0", probe  # only the probe's own scripts
    assert "fact exact match 0.00 \u2192 0.92 on 40 held-out questions" in probe.split("headline: ")[1], probe

    shot = tmp_path / "report.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", f"file://{page}")
    assert res.returncode == 0 and shot.stat().st_size > 20_000, res.stderr[-2000:]
