"""report.html: valid HTML, self-contained, one row and one histogram per bundle, images that decode."""

import base64
import json
import io
import re
import shutil
import subprocess

import html5lib
import matplotlib.image as mpimg
import pytest
from typer.testing import CliRunner

from edgebundle.cli import app
from edgebundle.pipeline.report import write_report


@pytest.fixture(scope="module")
def report(default_run):
    write_report(default_run.output)  # other tests may have rebuilt a bundle there since
    return (default_run.output / "report.html").read_text(encoding="utf-8")


def test_report_is_valid_html(report):
    parser = html5lib.HTMLParser(strict=True)  # raises on any parse error
    doc = parser.parse(report)
    assert doc is not None


def test_report_has_a_row_per_bundle_with_figures_from_the_manifests(default_run, report):
    body = report.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr>") == len(default_run.bundles) == 2
    for b in default_run.bundles:
        p50 = json.loads((b.path / "manifest.json").read_text())["latency"]["p50_ms"]
        assert f"{p50:.4f} ms" in body
        assert f'alt="latency histogram {b.target}"' in report
    assert 'alt="accuracy vs latency"' in report


def test_report_is_self_contained_and_its_images_decode(report):
    assert not re.search(r'(src|href)="(?!data:)', report), "no external resources"
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', report)
    assert len(pngs) == 3  # two histograms + the trade-off plot
    for b64 in pngs:
        raw = base64.b64decode(b64, validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(io.BytesIO(raw), format="png")
        assert img.shape[0] > 100 and img.shape[1] > 200
        assert img[..., :3].std() > 0.01  # not a blank canvas


def test_report_command_rewrites_it(default_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(default_run.bundles[0].path, out / "ort-cpu")
    r = CliRunner().invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    text = (out / "report.html").read_text()
    assert text.split("<tbody>")[1].count("<tr>") == 1
    r = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "not a folder" in r.output


def test_report_renders_in_a_browser_when_one_is_installed(default_run, tmp_path):
    """Headless Chromium screenshot where Chromium exists; the HTML checks above run everywhere."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        write_report(default_run.output)  # still exercised: the writer itself
        return
    shot = tmp_path / "report.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,1600", (default_run.output / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = mpimg.imread(shot)
    assert img.shape[:2] == (1600, 1200) and img[..., :3].std() > 0.01


def test_a_value_json_cannot_hold_is_shown_not_a_crash():
    """An exact match's SNR is infinite and the manifest keeps it as null: the plots leave that point out and the
    tables say n/a (the report of such a bundle was a TypeError)."""
    from edgebundle.pipeline.report import _fmt, _speed_fidelity

    png = base64.b64decode(_speed_fidelity([("exact", 1.0, None, True), ("int8", 1.4, 31.5, True)]))
    assert png.startswith(b"\x89PNG") and _fmt(None, ".6g") == "n/a"


def test_the_search_plot_shows_candidates_refused_before_timing_at_their_macs_bound():
    """A search row refused before its int8 build has no speed-up; the plot still shows what its fp32 student
    kept, at 1 / its MACs ratio and hollow (within None), so a search whose candidates all failed is not one dot."""
    from edgebundle.pipeline.report import _speed_fidelity, search_points

    rows = [{"label": "unpruned", "speedup": 1.01, "value": 0.99, "within": True},
            {"label": "ratio 0.5", "macs_ratio": 0.5, "value": 0.91, "within": False, "fp32_over": True},
            {"label": "ratio 0.8", "status": "not tried", "within": False}]
    assert search_points(rows) == [("unpruned", 1.01, 0.99, True), ("ratio 0.5", 2.0, 0.91, None)]
    assert base64.b64decode(_speed_fidelity(search_points(rows))).startswith(b"\x89PNG")


def test_labels_of_near_equal_points_do_not_print_over_each_other():
    """Two candidates of near-equal speed and fidelity (the unpruned model and two blocks dropped, 1.01x and
    1.04x, both 100 %) had their labels printed over each other; each label now sits where it overlaps none."""
    from edgebundle.pipeline.report import _pyplot, place_labels

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    pts = [("unpruned", 1.01, 100.0), ("depth ratio 0.15", 1.045, 100.0), ("input scale 0.933", 1.13, 99.3),
           ("depth ratio 0.15, input scale 0.933", 1.33, 99.3), ("input scale 0.867", 1.32, 98.6)]
    labels = []
    for name, x, y in pts:
        ax.scatter([x], [y])
        labels.append(ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8))
    place_labels(fig, ax, labels)
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in labels]
    plt.close(fig)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
