"""`OUT/report.html`: one self-contained page over every bundle in an output folder.

Per target a row (size, accuracy, p50 with its 95 % CI, speedup vs PyTorch fp32 and vs fp32 on the same
runtime), a latency histogram per target and an accuracy-vs-latency plot. The plots are matplotlib PNGs
embedded as base64 `data:` URIs, so the file can be mailed or archived by CI on its own.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import os
from pathlib import Path

from edgebundle.core.host import contention_text
from edgebundle.core.metrics import accuracy_text
from edgebundle.core.errors import BundleError
from edgebundle.pipeline.bundle import MANIFEST, Manifest, read_manifest, verify_files
from edgebundle.pipeline.lock import LOCKS, file_lock
from edgebundle.stages.search import start_kept

REPORT = "report.html"

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
.note{color:#8a5a00}.small{color:#666;font-size:90%}
tr.rejected td{color:#b00020}.rejected b{color:#b00020}
figure{display:inline-block;margin:0 1em 1em 0}img{max-width:100%}
"""


def bundles_in(output: Path) -> list[tuple[Path, Manifest]]:
    """Finished bundles (sub-folders with a valid manifest) in an output folder, by name."""
    found = []
    for d in sorted(Path(output).iterdir()):
        if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST).is_file():
            found.append((d, read_manifest(d)))
    return found


def _changed(folder: Path) -> list[str]:
    try:
        return verify_files(folder)
    except BundleError as e:
        return [str(e)]


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _histogram(name: str, samples: list[float], p50: float) -> str:
    import numpy as np

    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    lo, hi = float(np.min(samples)), float(np.percentile(samples, 99))
    ax.hist(samples, bins=min(40, max(5, len(samples) // 8)), range=(lo, hi if hi > lo else lo * 1.01 + 1e-9),
            color="#4a7bb7")  # up to p99: the rare slow outliers would squash the body of the distribution
    ax.axvline(p50, color="#c0392b", label=f"p50 {p50:.4g} ms")
    ax.set_xlabel("latency per inference (ms), up to p99")
    ax.set_ylabel("count")
    ax.set_title(name)
    ax.legend(fontsize=8)
    return _png(fig)


def _tradeoff(points: list[tuple[str, float, float]], metric: str = "top1") -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, lat, acc in points:
        ax.scatter([lat], [acc], s=40)
        ax.annotate(label, (lat, acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency (ms, log scale)")
    ax.set_ylabel({"top1": "top-1 accuracy (%)", "agreement": "top-1 agreement with fp32 (%)",
                   "cosine": "min cosine vs fp32", "snr": "SNR vs fp32 (dB)"}.get(metric, metric))
    ax.set_title("accuracy vs latency")
    ax.grid(alpha=0.3)
    return _png(fig)


def _int8_form_text(r: dict) -> str:
    parts = ([f"{r['layers_kept_float']} layers kept float"] if r.get("layers_kept_float") else []) + (
        ["QAT"] if r.get("qat") else [])
    return f" ({', '.join(parts)})" if parts else ""


def _search_html(search: dict) -> list[str]:
    """The structure search's table and its speed-versus-fidelity plot."""
    e = html.escape
    rows = []
    for r in search["rows"]:
        kept = r["candidate"] == search["chosen"]
        speed = (f"{r['speedup']:.2f}x [{r['speedup_ci95'][0]:.2f}, {r['speedup_ci95'][1]:.2f}]"
                 if "speedup" in r else "n/a")
        rows.append(f"<tr><td class=l>{e(r['label'])}{' <b>(kept)</b>' if kept else ''}</td>"
                    f"<td>{_fmt(r.get('macs_ratio'), '.3f')}</td><td>{r.get('params', '')}</td>"
                    f"<td>{speed}</td><td class=l>{e(r.get('summary') or r.get('line') or r.get('why', ''))}"
                    f"{e(_int8_form_text(r))}{e(start_kept(r, ' ({})'))}</td>"
                    f"<td class=l>{e(r.get('status', ''))}</td></tr>")
    pts = search_points(search["rows"])
    out = ["<h2>Structure search</h2>",
           f"<p class=small>Candidates pruned from the original (briefly distilled where they missed the budget as "
           f"pruned), built as {e(search['target'])} "
           f"builds int8, judged on the validation split against the original model and timed interleaved against "
           f"the unpruned model built the same way; {search['minutes']} of {search['search_minutes']:g} minutes.</p>",
           "<table><thead><tr><th class=l>candidate</th><th>MACs vs original</th><th>parameters</th>"
           "<th>speed-up vs unpruned [95% CI]</th><th class=l>validation vs original</th><th class=l>status</th>"
           "</tr></thead><tbody>", *rows, "</tbody></table>"]
    if pts:
        out.append(f'<figure><img alt="speed vs fidelity" src="data:image/png;base64,{_speed_fidelity(pts)}"></figure>'
                   "<p class=small>Hollow: refused before its int8 build (its fp32 student over budget on validation or "
                   "on the held-out groups), drawn at the speed-up its MACs allow, not a measured one.</p>")
    return out


def search_points(rows: list[dict]) -> list[tuple[str, float, float, bool | None]]:
    """The search's rows as plot points (label, speed-up, validation value, within): timed rows at their measured
    speed-up; rows refused before any build (nothing timed) at 1 / their MACs ratio, `within` None (hollow)."""
    pts: list[tuple[str, float, float, bool | None]] = []
    for r in rows:
        if "speedup" in r:
            pts.append((r["label"], r["speedup"], r.get("value"), r.get("within", False)))
        elif r.get("macs_ratio") and r.get("value") is not None:
            pts.append((r["label"], 1.0 / r["macs_ratio"], r["value"], None))
    return pts


def _forms_html(bundles: list[tuple[Path, Manifest]]) -> list[str]:
    """Each int8 target's forms tried (post-training forms and the layers accuracy control kept float): metric on
    validation inputs against p50 on the build host, the Pareto front marked, and what was chosen."""
    e = html.escape
    out: list[str] = []
    for _, m in bundles:
        q = m.quantization or {}
        ft = q.get("forms_tried") or (q.get("post_training") or {}).get("forms_tried")
        if not ft or len(ft["points"]) < 2:
            continue
        if not out:
            out.append("<h2>int8 forms tried</h2>")
        name = m.target.name
        rows = [f"<tr><td class=l>{e(p['form'])}</td><td>{p['layers_kept_float']}</td><td>{_fmt(p['val_value'], '.6g')}</td>"
                f"<td>{_fmt(p.get('p50_ms'), '.3f', ' ms')}</td>"
                f"<td class=l>{'within' if p.get('within_budget') else 'over'}{', Pareto' if p.get('pareto') else ''}"
                "</td></tr>" for p in ft["points"]]
        pts = [(f"{p['layers_kept_float']}f", p["p50_ms"], p["val_value"], bool(p.get("within_budget")))
               for p in ft["points"] if p.get("p50_ms") is not None]
        out += [f"<h3>{e(name)}</h3><p class=small>Shipped: {e(ft['chosen'])}, {e(ft['chosen_by'])}; p50 timed on this "
                f"host ({e(ft['timed_on'])}), built for {e(ft['deployment_isa'])}.</p>",
                "<table><thead><tr><th class=l>form</th><th>layers float</th><th>validation metric</th><th>p50</th>"
                "<th class=l>budget</th></tr></thead><tbody>", *rows, "</tbody></table>"]
        if pts:
            out.append(f'<figure><img alt="int8 forms {e(name)}" src="data:image/png;base64,'
                       f'{_speed_fidelity(pts, "p50 on the build host (ms)", f"{name}: int8 forms (x: over budget)", "validation metric vs fp32")}">'
                       "</figure>")
    return out


def _speed_fidelity(points: list[tuple[str, float, float, bool | None]],
                    xlabel: str = "speed-up vs the unpruned int8 model (interleaved)",
                    title: str = "structure search: speed vs fidelity (x: over budget)",
                    ylabel: str = "validation metric vs original") -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    labels = []
    for label, speed, value, within in points:
        if speed is None or value is None:  # a value JSON cannot hold (an exact match's infinite SNR): no point
            continue
        if within is None:  # not timed: hollow, at the speed-up its MACs allow
            ax.scatter([speed], [value], s=40, marker="o", facecolors="none", edgecolors="tab:red")
        else:
            ax.scatter([speed], [value], s=40, marker="o" if within else "x",
                       color="tab:blue" if within else "tab:red")
        labels.append(ax.annotate(label, (speed, value), textcoords="offset points", xytext=(5, 4), fontsize=8))
    place_labels(fig, ax, labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _png(fig)


# where a point's label may sit, in points from it: above right, below right, above left, below left
_LABEL_SPOTS = (((5, 4), "left"), ((5, -11), "left"), ((-5, 4), "right"), ((-5, -11), "right"))


def place_labels(fig, ax, labels: list) -> None:
    """Move each point's label to the first spot next to it where it overlaps no label placed before and stays
    inside the axes (two candidates of near-equal speed and fidelity would otherwise print over each other);
    where no spot is free, the one overlapping least."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box, placed = ax.get_window_extent(renderer), []
    for text in labels:
        def cost(spot) -> float:
            offset, align = spot
            text.xyann = offset
            text.set_horizontalalignment(align)
            b = text.get_window_extent(renderer)
            out = max(0.0, b.x1 - box.x1) + max(0.0, box.x0 - b.x0) + max(0.0, b.y1 - box.y1) + max(0.0, box.y0 - b.y0)
            return out + sum(max(0.0, min(b.x1, o.x1) - max(b.x0, o.x0)) * max(0.0, min(b.y1, o.y1) - max(b.y0, o.y0))
                             for o in placed)
        costs = [cost(spot) for spot in _LABEL_SPOTS]
        cost(_LABEL_SPOTS[costs.index(min(costs))])  # the first free spot, else the least overlapping
        placed.append(text.get_window_extent(renderer))


def _fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def _chain_html(acc) -> str:
    """original -> student fp32 -> bundle, under the accuracy cell, where a compression stage ran."""
    if not acc.against:
        return ""
    steps = {s["step"]: s for s in acc.chain}
    st, bu = steps["student fp32"], steps["bundle"]

    def val(row) -> str:
        if not row:
            return "n/a"
        if acc.metric == "cosine":
            return f"cosine mean {row.get('cosine_mean', float('nan')):.4f} / min {row['value']:.4f}"
        return accuracy_text(acc.metric, row.get("reference_value"), row["value"])
    return (f"<br><span class=small>vs original: student fp32 ({html.escape(' + '.join(st['by']))}) "
            f"{html.escape(val(st['vs_original']))}; bundle {html.escape(val(bu['vs_original']))}</span>")


def render(bundles: list[tuple[Path, Manifest]]) -> str:
    e = html.escape
    rows, figures, points, notes = [], [], [], []
    for path, m in bundles:
        rows.append(_row(path, m, bundles[0][1].accuracy.metric, figures, points, notes))
    if bundles:  # the PyTorch fp32 references every bundle of one run shares
        m = bundles[0][1]
        for key, label, a in (("pytorch_fp32_teacher", "PyTorch fp32 teacher", m.accuracy.teacher_pytorch),
                              ("pytorch_fp32_student", "PyTorch fp32 student", m.accuracy.student_pytorch)):
            if key in m.reference_latency and a is not None and m.accuracy.metric == "top1":
                points.append((label, m.reference_latency[key]["p50_ms"], a))
    first = bundles[0][1] if bundles else None
    head = (f"<p>Recipe <b>{e(first.recipe.get('name', '?'))}</b> (sha256 {e(first.recipe.get('sha256', '')[:12])}); "
            f"host {e(str(first.host.get('cpu')))}, {first.host.get('usable_cores')} usable cores, "
            f"id {e(str(first.host.get('id')))}.</p>") if first else "<p>No bundles yet.</p>"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>edgebundle report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>edgebundle report</h1>", head,
        f"<p class=small>Written {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}. "
        "Latency is p50 per inference at the recipe's batch, with its 95 % bootstrap CI, measured on the host "
        "above; speedups compare p50s measured with the same protocol and threads.</p>",
        "<table><thead><tr><th class=l>target</th><th class=l>precision</th><th class=l>status</th><th>size</th>"
        "<th>accuracy reference &rarr; bundle</th><th>output cosine</th><th>p50 [95% CI]</th>"
        "<th>vs PyTorch fp32</th><th>vs fp32, same runtime</th></tr></thead><tbody>",
        *rows, "</tbody></table>",
    ]
    if notes:
        parts += ["<h2>Notes</h2><ul>", *(f"<li class=note>{e(n)}</li>" for n in notes), "</ul>"]
    if points:
        parts += ["<h2>Accuracy vs latency</h2>",
                  f'<figure><img alt="accuracy vs latency" src="data:image/png;base64,{_tradeoff(points, bundles[0][1].accuracy.metric)}"></figure>']
    parts += _devices_html(bundles)
    search = next((m.search for _, m in bundles if m.search), None)
    if search:
        parts += _search_html(search)
    parts += _forms_html(bundles)
    if figures:
        parts.append("<h2>Latency distributions</h2>")
        parts += [f'<figure><img alt="latency histogram {e(n)}" src="data:image/png;base64,{png}"></figure>'
                  for n, png in figures]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _devices_html(bundles: list[tuple[Path, Manifest]]) -> list[str]:
    """Every bundle's newest measurement on each device, side by side with the build host's figure; a figure of
    the build host or of an emulator is labelled so, never shown as a device's."""
    e = html.escape
    rows = []
    for path, m in bundles:
        newest: dict[str, dict] = {}
        for r in m.devices or []:
            newest[r["device"]] = r
        for name, r in newest.items():
            lat, acc, fp = r["latency"], r.get("accuracy"), r["fingerprint"]
            there = (f"{lat['p50_ms']:.4f} ms [{lat['p50_ci95_ms'][0]:.4f}, {lat['p50_ci95_ms'][1]:.4f}]"
                     if lat.get("p50_ci95_ms") else f"mean {lat['mean_ms']:.4f} ms")
            verdict = (e(r.get("note") or "not judged") if acc is None
                       else f"{'within' if acc['within_budget'] else '<b>over budget</b>:'} {e(acc['line'])}")
            host = f"{m.latency['p50_ms']:.4f} ms" if m.latency else "not measured"
            rows.append(f"<tr><td class=l>{e(path.name)}</td><td class=l>{e(name)} ({e(r['kind'])})<br>"
                        f"<span class=small>{e(str(fp.get('cpu')))}, {e(str(fp.get('machine')))}, "
                        f"{fp.get('usable_cores')} cores, {e(', '.join(f'{k} {v}' for k, v in fp.get('runtime', {}).items()))}"
                        f"</span></td><td class=l>{e(r['figure'])}</td>"
                        f"<td>{e(there)}</td><td>{host}</td>"
                        f"<td class=l>{verdict}</td><td class=l>{e(r['taken'])}</td></tr>")
    if not rows:
        return []
    return ["<h2>Measured on devices</h2>",
            "<p class=small>Each bundle's newest measurement per device (edgebundle measure / build --device): the "
            "device runner timed the artifact there with the host's protocol and ran the test split on the device's "
            "own kernels. <i>figure</i> says whose figure it is: a device's, the build host's (the same machine "
            "kind), or an emulator's.</p>",
            "<table><thead><tr><th class=l>bundle</th><th class=l>device</th><th class=l>figure</th>"
            "<th>p50 there [95% CI]</th><th>p50 on the build host</th><th class=l>accuracy there</th>"
            "<th class=l>taken</th></tr></thead><tbody>", *rows, "</tbody></table>"]


def _row(path: Path, m: Manifest, metric: str, figures: list, points: list, notes: list) -> str:
    """One bundle's table row; its latency histogram, trade-off point (same metric as the first bundle's)
    and notes are appended to the lists given."""
    e = html.escape
    size = sum(f.bytes for f in m.files.values())
    lat, acc = m.latency, m.accuracy
    if lat:
        ci = lat["p50_ci95_ms"]
        p50 = f"{lat['p50_ms']:.4f} ms [{ci[0]:.4f}, {ci[1]:.4f}]"
        if (lat.get("host_state") or {}).get("contended"):
            p50 += f"<br><b>contended</b>: {html.escape(contention_text(lat['host_state']))}"
        figures.append((m.target.name, _histogram(m.target.name, lat["samples_ms"], lat["p50_ms"])))
        if acc.target is not None and acc.metric == metric:
            points.append((f"{m.target.name} {m.target.precision}", lat["p50_ms"], acc.target))
    else:
        p50 = "not measured"
    sp = m.speedup
    rejected = m.target.status == "rejected"
    status = (f"<b>rejected</b>: {e(m.target.rejection or 'missed its accuracy budget')}" if rejected
              else e(m.target.status))
    changed = _changed(path)
    if changed:  # its figures are not to be trusted: say so where they are shown
        rejected = True
        status += f"<br><b>changed since written</b>: {e(', '.join(changed))}"
        notes.append(f"{path.name}: files changed since the bundle was written ({', '.join(changed)}): "
                     "its figures are not to be trusted")
    acc_text = accuracy_text(acc.metric, acc.fp32_onnx, acc.target, acc.judged_samples, acc.details,
                             vs=acc.against, interval=acc.interval)
    notes += [f"{m.target.name}: {n}" for n in m.notes]
    return (f"<tr{' class=rejected' if rejected else ''}><td class=l>{e(path.name)}</td>"
            f"<td class=l>{e(m.target.precision)}</td>"
            f"<td class=l>{status}</td><td>{size / 1024:.1f} KiB</td>"
            f"<td>{e(acc_text)}"
            f"{'' if acc.budget is None else '<br><span class=small>budget: ' + e(acc.budget) + '</span>'}"
            f"{_chain_html(acc)}</td>"
            f"<td>{_fmt(acc.output_cosine_vs_fp32, '.5f')}</td><td>{p50}</td>"
            f"<td>{_fmt(sp.get('vs_pytorch_fp32_teacher'), '.2f', 'x')}</td>"
            f"<td>{_fmt(sp.get('vs_same_runtime_fp32'), '.2f', 'x')}</td></tr>")


def write_report(output: Path) -> Path:
    """(Re)write OUT/report.html from every finished bundle in OUT, atomically and one writer at a time."""
    output = Path(output)
    final = output / REPORT
    with file_lock(output / LOCKS / "report.lock", wait=True, what=f"report {final}"):
        text = render(bundles_in(output))
        tmp = output / f".{REPORT}.tmp-{os.getpid()}"
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise BundleError(f"cannot write report {final}: {e.strerror or e}") from e
    return final
