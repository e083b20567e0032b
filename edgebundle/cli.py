"""Command line: a thin Typer layer over the library. Errors are one red line and exit code 2."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape as esc
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgebundle.core.errors import BundleError, EdgeBundleError, IntegrityError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Prune, distill, export and int8-calibrate a PyTorch model into measured device bundles.")
console = Console()
err_console = Console(stderr=True)

def _label(stage: str) -> str:
    """A progress line's label: what the stage declares, else its name."""
    if stage == "reference":
        return "reference latency (fp32)"
    from edgebundle.stages import registry as stage_registry

    s = stage_registry.get(stage)
    return (s.label if s is not None and s.label else stage)


def _fail(e: BaseException, debug: bool) -> None:
    if debug:
        console.print_exception()
    _error_line(str(e))
    raise typer.Exit(2)


def _error_line(text: str) -> None:
    """One red line on stderr: 'error: ...' (its whitespace, newlines included, made single spaces)."""
    err_console.print(f"[bold red]error:[/] {esc(' '.join(text.split()))}", highlight=False, soft_wrap=True)


def _target_lines(bundles, debug: bool) -> int:
    """One line per target that missed its budget or failed; the exit code (1 when any did, else 0)."""
    from rich.traceback import Traceback

    bad = [b for b in bundles if not b.ok]
    for b in bad:
        if debug and b.error is not None:
            err_console.print(Traceback.from_exception(type(b.error), b.error, b.error.__traceback__))
        label = "rejected" if b.status == "rejected" else "failed"
        kept = f" (kept as {b.path})" if b.path is not None else ""
        err_console.print(f"[bold red]{label}:[/] {esc(' '.join(str(b.reason).split()))}{esc(kept)}",
                          highlight=False, soft_wrap=True)
    return 1 if bad else 0


class ProgressMode(str, Enum):
    auto = "auto"
    bar = "bar"
    plain = "plain"


PROGRESS_HELP = ("auto: bars in a terminal, timestamped lines otherwise (a CI log, `> log`); bar; plain: one line "
                 "per stage start and end and per training epoch")


PACK = typer.Option(False, "--pack", help="also write OUT/<target>.tar.gz per bundle")
KEEP_REJECTED = typer.Option(False, "--keep-rejected", help="keep a bundle that missed its accuracy budget as "
                             "OUT/<target>.rejected (status: rejected)")
DEBUG = typer.Option(False, "--debug", help="show the traceback on errors")
PROGRESS = typer.Option(ProgressMode.auto, "--progress", help=PROGRESS_HELP)


class _StageProgress:
    """The runner's events shown: a rich bar per stage (epochs of training, distillation and QAT move it), or,
    off a terminal, one timestamped line per stage start, end and epoch, written as it happens."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress, self.tasks, self.t0 = progress, {}, {}

    def _line(self, text: str) -> None:
        console.print(f"{time.strftime('%H:%M:%S')} {text}", markup=False, highlight=False, soft_wrap=True)
        console.file.flush()

    def __call__(self, kind: str, stage: str, **info) -> None:
        label = _label(stage)
        if kind == "start":
            self.t0[stage] = time.perf_counter()
            if self.progress is None:
                self._line(f"{label}: {'(cached)' if info.get('cached') else 'started'}")
            else:
                self.tasks[stage] = self.progress.add_task(label, total=1)
        elif kind == "note":
            if self.progress is None:
                self._line(f"note: {info.get('text', '')}")
            else:
                self.progress.console.print(f"  [yellow]note:[/] {esc(info.get('text', ''))}")
        elif kind == "epoch":
            text = (f"epoch {info['epoch']}/{info['epochs']}, {info['metric']} {info['value']:.4g} "
                    f"(best {info['best']:.4g})")
            if self.progress is None:
                self._line(f"{label}: {text}")
            elif stage in self.tasks:
                self.progress.update(self.tasks[stage], completed=info["epoch"] / info["epochs"],
                                     description=f"{label} [dim]{esc(text)}[/]")
        elif kind == "candidate":  # the structure search's candidates, one line each
            if self.progress is None:
                self._line(f"{label}: {info['text']}")
            elif stage in self.tasks:
                self.progress.console.print(f"  {esc(label)}: {esc(info['text'])}")
        elif kind == "done":
            took = time.perf_counter() - self.t0.get(stage, time.perf_counter())
            if self.progress is None:
                if not info.get("cached"):
                    self._line(f"{label}: {info.get('status', 'done')} in {took:.1f}s")
            elif stage in self.tasks:
                suffix = " [dim](cached)[/]" if info.get("cached") else f" [dim]{took:.1f}s[/]"
                self.progress.update(self.tasks[stage], completed=1, description=label + suffix)


@contextlib.contextmanager
def _display(mode: ProgressMode, show: bool = True):
    """The event callback for a command: bars in a terminal (or with --progress bar), plain lines otherwise."""
    if not show:
        yield lambda *a, **k: None
    elif mode == ProgressMode.bar or (mode == ProgressMode.auto and console.is_terminal):
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console, transient=False) as progress:
            yield _StageProgress(progress)
    else:
        yield _StageProgress(None)


def _summary_table(bundles) -> Table:
    t = Table(title="edgebundle bundles", show_lines=False)
    for col in ("target", "precision", "size", "accuracy (reference → bundle)", "p50 [95% CI]",
                "vs fp32, same runtime, interleaved"):
        t.add_column(col, justify="right" if col not in ("target", "precision") else "left")
    for b in bundles:
        m = b.manifest
        if m is None:
            continue
        size = sum(f["bytes"] for f in m["files"].values())
        acc = m["accuracy"]
        lat = m["latency"]
        acc_s = _accuracy_text(acc)
        if b.status == "rejected":
            acc_s = f"[red]{acc_s} (rejected)[/]"
        if lat is None:  # e.g. a TensorRT bundle whose engine is pending on a GPU machine
            t.add_row(b.target, m["target"]["precision"], f"{size / 1024:.1f} KiB", acc_s,
                      f"not measured ({m['target']['status']})", "n/a")
            continue
        ci = lat["p50_ci95_ms"]
        busy = " [yellow](contended)[/]" if (lat.get("host_state") or {}).get("contended") else ""
        t.add_row(b.target, m["target"]["precision"], f"{size / 1024:.1f} KiB", acc_s,
                  f"{lat['p50_ms']:.4f} ms [{ci[0]:.4f}, {ci[1]:.4f}]{busy}", _same_runtime_text(m["speedup"]))
    return t


def _same_runtime_text(sp: dict) -> str:
    """The bundle against fp32 on its own runtime: interleaved where measured so (the figure to decide on), else
    the ratio of two p50s measured one after the other ('seq.')."""
    x = sp.get("vs_same_runtime_fp32")
    if x is None:
        return "n/a"
    return f"{x:.2f}x" + ("" if sp.get("vs_same_runtime_fp32_interleaved") is not None else " seq.")


def _accuracy_text(acc: dict) -> str:
    from edgebundle.core.metrics import accuracy_text

    from edgebundle.pipeline.bundle import Accuracy

    return accuracy_text(acc["metric"], acc.get("fp32_onnx"), acc.get("target"), acc.get("judged_samples"),
                         acc.get("details"), vs=Accuracy.model_validate(acc).against, interval=acc.get("interval"))


@app.command()
def run(
    recipe: Optional[Path] = typer.Argument(None, help="recipe YAML; omitted: the embedded default (digits CNN)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="output folder (default: the recipe's)"),
    target: Optional[list[str]] = typer.Option(None, "--target", "-t", help="build only these targets"),
    pack: bool = PACK,
    keep_rejected: bool = KEEP_REJECTED,
    debug: bool = DEBUG,
    progress_mode: ProgressMode = PROGRESS,
) -> None:
    """Run the whole pipeline: prepare (prune, distill, export) and build a bundle per target.

    Exit 0: every target's bundle is within its accuracy budget; 1: a target missed its budget or failed
    (one line each; the other targets' bundles are kept); 2: bad input."""
    from edgebundle.core.recipe import load_recipe
    from edgebundle.pipeline.runner import run as run_pipeline

    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise EdgeBundleError("under torchrun use `edgebundle prepare RECIPE -o WORK` (distributed training), "
                                  "then `edgebundle build WORK` on each target's machine")
        r = load_recipe(recipe)
        with _display(progress_mode) as on_event:
            result = run_pipeline(r, output=output, targets=target or None, on_event=on_event,
                                  pack=pack, keep_rejected=keep_rejected)
    except EdgeBundleError as e:
        _fail(e, debug)
    _print_bundles(result.bundles)
    raise typer.Exit(_target_lines(result.bundles, debug))


def _print_bundles(bundles) -> None:
    shown = [b for b in bundles if b.manifest is not None]
    if shown:
        console.print(_summary_table(shown))
    for b in shown:
        if b.ok:
            console.print(f"[green]bundle[/] {b.path}" + (f" (packed: {b.archive})" if b.archive else ""))
        for note in b.manifest.get("notes", []):
            console.print(f"  [yellow]note:[/] {esc(note)}")
    folder = next((b.path.parent for b in shown), None)
    if folder is not None and (folder / "report.html").is_file():
        console.print(f"[green]report[/] {folder / 'report.html'}")


@app.command()
def prepare(
    recipe: Optional[Path] = typer.Argument(None, help="recipe YAML; omitted: the embedded default"),
    work: Path = typer.Option(..., "--output", "-o", help="work folder (content-addressed; reused across runs)"),
    debug: bool = DEBUG,
    progress_mode: ProgressMode = PROGRESS,
) -> None:
    """Run the device-independent stages (teacher, prune, distill, export, calibration data) into WORK.

    Under `torchrun --nproc-per-node N -m edgebundle.cli prepare ...` training runs DistributedDataParallel.
    """
    from edgebundle.core import distributed
    from edgebundle.core.recipe import load_recipe
    from edgebundle.pipeline.prepare import prepare as prepare_stages

    try:
        r = load_recipe(recipe)
        distributed.init_from_env()
        with _display(progress_mode, show=distributed.is_main()) as on_event:
            p = prepare_stages(r, work, on_event=on_event)
    except EdgeBundleError as e:
        _fail(e, debug)
    finally:
        main = distributed.is_main()
        distributed.shutdown()
    if not main:
        return
    console.print(f"[green]prepared[/] {work} (student {p.onnx.folder.name}); "
                  f"next: edgebundle build {work} --target NAME")


@app.command()
def build(
    work: Path = typer.Argument(..., help="work folder made by `edgebundle prepare`"),
    target: Optional[list[str]] = typer.Option(None, "--target", "-t", help="targets to build (default: all)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="output folder (default: the recipe's)"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="the prepared recipe file, when its relative "
                                          "paths must resolve in this checkout"),
    pack: bool = PACK,
    keep_rejected: bool = KEEP_REJECTED,
    device: Optional[str] = typer.Option(None, "--device", help="also measure and judge each bundle on this device: "
                                         "ssh://user@host[:port] or local; over budget there: rejected"),
    debug: bool = DEBUG,
    progress_mode: ProgressMode = PROGRESS,
) -> None:
    """Build target bundles from a prepared work folder (the per-target job on that target's machine).

    Exit codes as for `run`: 1 when a target missed its budget or failed, 2 for bad input."""
    from edgebundle.core.recipe import DeviceSpec, load_recipe
    from edgebundle.pipeline.build import build as build_targets

    try:
        r = load_recipe(recipe) if recipe is not None else None
        dev = DeviceSpec.from_url(device) if device else None
        with _display(progress_mode) as on_event:
            bundles = build_targets(work, targets=target or None, output=output, recipe=r,
                                    on_event=on_event, pack=pack, keep_rejected=keep_rejected, device=dev)
    except EdgeBundleError as e:
        _fail(e, debug)
    _print_bundles(bundles)
    raise typer.Exit(_target_lines(bundles, debug))


@app.command()
def measure(
    bundle: Path = typer.Argument(..., help="a bundle folder (OUT/<target>)"),
    device: str = typer.Option(..., "--device", help="ssh://user@host[:port], adb://SERIAL (with --runner) or local"),
    work: Optional[Path] = typer.Option(None, "--work", help="the work folder the bundle was built from: its test "
                                        "split runs on the device and is judged by the bundle's contract"),
    identity_file: Optional[Path] = typer.Option(None, "--identity-file", "-i", help="ssh: the key to log in with"),
    ssh_option: Optional[list[str]] = typer.Option(None, "--ssh-option", help="ssh: an -o option (repeatable)"),
    python: str = typer.Option("python3", "--python", help="the device's Python"),
    bench_runner: Optional[str] = typer.Option(None, "--runner", help="adb: the runtime's benchmark binary on the "
                                               "device (executor_runner, onnxruntime_perf_test, benchmark_model)"),
    debug: bool = DEBUG,
) -> None:
    """Measure a bundle on a device and add the measurement to its manifest (it still verifies).

    Exit 0: measured (and within budget where judged); 1: over budget on the device; 2: bad input or the device
    could not be reached."""
    from edgebundle.core.recipe import DeviceSpec
    from edgebundle.pipeline.remeasure import measure_bundle

    try:
        spec = DeviceSpec.from_url(device, runner=bench_runner)
        spec = spec.model_copy(update={"identity_file": identity_file, "ssh_options": list(ssh_option or []),
                                       "python": python})
        done = measure_bundle(bundle, spec, work=work)
    except EdgeBundleError as e:
        _fail(e, debug)
    r = done.record
    lat = r["latency"]
    fp = r["fingerprint"]
    figure = (f"p50 {lat['p50_ms']:.3f} ms [{lat['p50_ci95_ms'][0]:.3f}, {lat['p50_ci95_ms'][1]:.3f}], "
              f"{lat['threads']} threads" if lat.get("p50_ci95_ms") else f"mean {lat['mean_ms']:.3f} ms ({r['how']})")
    console.print(f"[green]measured[/] {done.bundle} on {esc(r['device'])} ({esc(str(fp.get('cpu')))}, "
                  f"{fp.get('machine')}; {r['figure']} figure): {esc(figure)}", highlight=False)
    acc = r.get("accuracy")
    if acc is None:
        console.print(f"  [yellow]note:[/] {esc(r['note'])}")
        raise typer.Exit(0)
    if done.rejection:
        err_console.print(f"[bold red]rejected:[/] {esc(done.rejection)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"  on the device: {esc(acc['line'])}", highlight=False)


def _size(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        n = float(t[:-1] if t[-1:] in "KMGT" else t) * mult
    except ValueError as e:
        raise typer.BadParameter(f"'{text}' is not a size (e.g. 20G, 512M)") from e
    if not n > 0:
        raise typer.BadParameter(f"'{text}' must be more than 0")
    return int(n)


MAX_SIZE_HELP = "largest total unpacked size (e.g. 20G; default 16G)"
MAX_RATIO_HELP = "largest unpacked / packed size ratio (default 100)"


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="bundle folder or packed bundle (.tar.gz)"),
    max_unpacked_size: str = typer.Option("16G", help=MAX_SIZE_HELP),
    max_ratio: float = typer.Option(100.0, min=1.0, help=MAX_RATIO_HELP),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Recompute every file's sha256 against the manifest and SHA256SUMS. Exit 0 = intact, 1 = changed or a
    rejected bundle (intact, but it missed its accuracy budget: not for shipping)."""
    import tempfile

    from edgebundle.pipeline.bundle import read_manifest, unpack, verify_files

    rejection = None
    try:
        if not bundle.exists():
            raise BundleError(f"not found: {bundle}")
        if bundle.is_file():
            with tempfile.TemporaryDirectory() as td:
                # refuses unsafe members and bombs, verifies, raises naming the files
                folder = unpack(bundle, Path(td), max_bytes=_size(max_unpacked_size), max_ratio=max_ratio)
                m = read_manifest(folder)
            bad = []
        else:
            bad = verify_files(bundle)
            m = None if bad else read_manifest(bundle)
        if m is not None and m.target.status == "rejected":
            rejection = m.target.rejection or "missed its accuracy budget"
    except IntegrityError as e:
        bad = e.files
    except EdgeBundleError as e:
        _fail(e, debug)
    if bad:
        what = "outside the bundle" if any(b.endswith("(outside the bundle)") for b in bad) else (
            "unsafe" if any(b.endswith(")") for b in bad) else "changed")
        err_console.print(f"[bold red]{what}:[/] {esc(str(bundle))}: {esc(', '.join(bad))}", highlight=False,
                          soft_wrap=True)
        raise typer.Exit(1)
    if rejection:
        err_console.print(f"[bold red]rejected:[/] {esc(str(bundle))}: intact, but rejected: {esc(rejection)}",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[green]ok[/] {bundle}: every file matches its manifest")


@app.command()
def unpack(
    archive: Path = typer.Argument(..., help="packed bundle (.tar.gz)"),
    output: Path = typer.Option(Path("."), "--output", "-o", help="folder to unpack into"),
    max_unpacked_size: str = typer.Option("16G", help=MAX_SIZE_HELP),
    max_ratio: float = typer.Option(100.0, min=1.0, help=MAX_RATIO_HELP),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Unpack a packed bundle safely (no absolute paths, '..', links or special files) and verify it."""
    from edgebundle.pipeline.bundle import unpack as unpack_bundle

    try:
        if not archive.is_file():
            raise BundleError(f"not found: {archive}")
        path = unpack_bundle(archive, output, max_bytes=_size(max_unpacked_size), max_ratio=max_ratio)
    except EdgeBundleError as e:
        _fail(e, debug)
    console.print(f"[green]unpacked[/] {path}")


@app.command()
def explain(
    bundle: Path = typer.Argument(..., help="bundle folder or manifest.json"),
    top: int = typer.Option(20, help="rows to show (most damaged layers first)"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Per-layer int8 error table (SQNR vs fp32) and what accuracy control kept in float."""
    from edgebundle.calibration.accuracy import layers_kept_float
    from edgebundle.pipeline.bundle import read_manifest

    try:
        m = read_manifest(bundle)
    except EdgeBundleError as e:
        _fail(e, debug)
    q = m.quantization
    rows = q.get("layer_errors")
    if not rows:
        why = ("; dynamic int8 has no Q/DQ pairs to compare" if q.get("mode") == "dynamic" else
               "; the QAT program was exported from PyTorch, not quantized layer by layer" if q.get("qat") else "")
        _error_line(f"{bundle} has no per-layer error table (target {m.target.name}, precision "
                    f"{m.target.precision}{why})")
        raise typer.Exit(2)
    kept = set(layers_kept_float(q))
    t = Table(title=f"int8 error per layer: {m.target.name} (lower SQNR = more damage)")
    for col in ("PyTorch module", "ONNX node", "op", "weight SQNR dB", "input SQNR dB", "kept in float"):
        t.add_column(col)
    for r in rows[:top]:
        t.add_row(r.get("module") or "-", r["node"], r["op"], str(r["weight_sqnr_db"]), str(r["input_sqnr_db"]),
                  "yes" if r["node"] in kept else "")
    console.print(t)
    b = q.get("accuracy_budget")
    if b:
        def fmt(x) -> str:  # None: a value JSON cannot hold (an exact match's infinite SNR)
            return "n/a" if x is None else f"{x:.2f}"

        console.print(f"accuracy ({b['metric']}, {b['split']}): full int8 drop {fmt(b['drop_full_int8'])}, "
                      f"reached {fmt(b.get('drop_reached', b['drop_full_int8']))}, budget {b['max_drop']}; "
                      f"{len(kept)} layer(s) kept in float")


@app.command()
def report(
    output: Path = typer.Argument(..., help="output folder holding bundles"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """(Re)write OUTPUT/report.html from the bundles in OUTPUT."""
    from edgebundle.pipeline.report import bundles_in, write_report

    try:
        if not output.is_dir():
            raise BundleError(f"not a folder: {output}")
        if not bundles_in(output):
            raise BundleError(f"no bundles in {output} (a bundle is a sub-folder with a manifest.json)")
        path = write_report(output)
    except EdgeBundleError as e:
        _fail(e, debug)
    console.print(f"[green]report[/] {path}")


def _fraction(text: str) -> float:
    t = text.strip()
    try:
        return float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    except ValueError as e:
        raise typer.BadParameter(f"'{text}' is not a fraction or percentage (e.g. 5% or 0.05)") from e


@app.command()
def check(
    candidate: Path = typer.Argument(..., help="candidate bundle folder or manifest.json"),
    baseline: Path = typer.Option(..., "--baseline", "-b", help="baseline bundle folder or manifest.json"),
    tolerance: str = typer.Option("5%", help="allowed latency slowdown (5% or 0.05)"),
    accuracy_tolerance: float = typer.Option(0.5, help="allowed accuracy drop in points"),
    allow_different_host: bool = typer.Option(False, help="compare figures from different hosts (flagged)"),
    rounds: int = typer.Option(60, min=4, help="interleaved rounds (candidate and baseline alternate)"),
    per_round: int = typer.Option(20, min=1, help="inferences per model per round"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    junit: Optional[Path] = typer.Option(None, help="also write a JUnit XML report here"),
    device: Optional[str] = typer.Option(None, "--device", help="gate on both bundles' newest measurements on this "
                                         "device (its name in their manifests' devices records)"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Did CANDIDATE get slower or less accurate than BASELINE? Exit 0 = no, 1 = regression, 2 = error."""
    from edgebundle.pipeline.check import check as run_check, junit_xml, to_json

    try:
        res = run_check(candidate, baseline, tolerance=_fraction(tolerance), accuracy_tolerance=accuracy_tolerance,
                        allow_different_host=allow_different_host, rounds=rounds, per_round=per_round,
                        device=device)
        if junit is not None:
            try:
                junit.write_text(junit_xml(res))
            except OSError as e:
                raise BundleError(f"cannot write JUnit report {junit}: {e.strerror or e}") from e
    except EdgeBundleError as e:
        _fail(e, debug)
    if as_json:
        sys.stdout.write(to_json(res) + "\n")
    else:
        t = Table(title=f"edgebundle check: {res.target} ({res.mode})")
        for col in ("", "candidate", "baseline", "ratio / drop", "limit", "verdict"):
            t.add_column(col)
        t.add_row("p50 latency", f"{res.candidate_p50_ms:.4f} ms", f"{res.baseline_p50_ms:.4f} ms",
                  f"{res.ratio:.3f} [{res.ratio_ci95[0]:.3f}, {res.ratio_ci95[1]:.3f}]", f"{1 + res.tolerance:.3f}",
                  "[red]REGRESSION[/]" if res.latency_regression else "[green]ok[/]")
        ca, ba = res.candidate_accuracy, res.baseline_accuracy
        def ci(iv, groups) -> str:
            return ("" if not iv else f" [{iv[0]:.4g}–{iv[1]:.4g}]") + ("" if groups is None else f", {groups} groups")
        t.add_row(f"accuracy vs {res.accuracy_reference}",
                  "n/a" if ca is None else f"{ca:.4g}{ci(res.candidate_interval, res.candidate_groups)}",
                  "n/a" if ba is None else f"{ba:.4g}{ci(res.baseline_interval, res.baseline_groups)}",
                  "n/a" if ca is None or ba is None else f"{ba - ca:+.2f} pts", f"{res.accuracy_tolerance} pts",
                  "[red]REGRESSION[/]" if res.accuracy_regression else "[green]ok[/]")
        console.print(t)
        for n in res.notes:
            console.print(f"[yellow]note:[/] {esc(n)}")
    raise typer.Exit(1 if res.regression else 0)


@app.command()
def recipe() -> None:
    """Print the embedded default recipe (a starting point for your own)."""
    from edgebundle.core.recipe import default_recipe_text

    sys.stdout.write(default_recipe_text())


@app.command()
def targets() -> None:
    """List the targets, what each needs and whether it is available here."""
    from edgebundle.targets import registry

    cols = ("name", "precisions", "runtime", "needs GPU", "extra", "available here")
    rows = []
    for name in registry.names():
        e = registry.lookup(name)
        target = e.factory()
        why = target.unavailable_reason(None)
        pending = target.pending_reason(None)
        c = e.capabilities
        here = (f"no: {why}" if why else f"partly: builds a pending bundle ({pending})" if pending else "yes")
        rows.append((name, ", ".join(c.precisions), c.runtime, "yes" if c.needs_gpu else "no", c.extra or "-", here))
    if not console.is_terminal:  # piped or logged: whole lines, one per target (a table would cut the hints)
        for row in (cols, *rows):
            sys.stdout.write("\t".join(row) + "\n")
        return
    t = Table(title="targets")
    for col in cols:
        t.add_column(col)
    for row in rows:
        t.add_row(*row[:-1], esc(row[-1]))
    console.print(t)


class Terminated(BaseException):
    """SIGTERM or SIGINT (Ctrl-C), raised where the process is: every `with` and `finally` on the way out runs
    (temporary folders removed, locks released), and nothing half-written is left. Not a KeyboardInterrupt, which
    the command-line layer would turn into a silent exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


# third-party loggers whose messages are not the user's business in a normal run (shown with --debug):
# torchao's "Failed to load ..._C_mxfp8.so" for CUDA kernels a CPU build never uses, torch's pytree notes
# on Enum registration, NNCF's statistics tables, onnxscript's version-converter notes (the exporter checks the
# opset it got)
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "nncf", "onnxscript")


def quiet_third_parties() -> None:
    """Keep the tool's own lines readable: the loggers above at ERROR, NNCF's progress bars, Hugging Face's
    per-load progress bars ("Loading weights" for every model load) and litert-torch's converter notes off.
    Called before any of them is imported."""
    import logging

    import rich

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # NNCF draws its progress bars ("Statistics collection", "Applying Bias correction") on rich's global
    # console; the tool's own output goes through its own consoles above
    rich.get_console().quiet = True
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow huggingface_hub's
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # litert-torch's converter: its progress lines (rich, on stdout) and the root logger's warning that 64-bit
    # token ids become 32-bit model inputs (the litert session feeds the model's own dtype)
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    logging.getLogger().addFilter(lambda record: "enable_x64=False downcasts" not in record.getMessage())


def main() -> None:
    import signal

    debug = "--debug" in sys.argv
    if not debug:
        quiet_third_parties()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    try:
        code = app(standalone_mode=False)  # errors come here: each is one line, never click's usage box
    except Terminated as t:
        sys.exit(_stopped("interrupted (Ctrl-C)" if t.signum == signal.SIGINT else "SIGTERM", 128 + t.signum))
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(_stopped("interrupted (Ctrl-C)", 128 + signal.SIGINT))
    except Exception as e:
        code = _usage_error(e)
        if code is None:  # escaped every command's own handling: still one line (--debug: the traceback)
            if debug:
                console.print_exception()
            from edgebundle.core.errors import first_line

            _error_line(f"{first_line(e)} (run with --debug for where)")
            code = 2
    sys.exit(code or 0)


def _stopped(why: str, code: int) -> int:
    err_console.print(f"[bold red]stopped:[/] {why}; nothing half-written was left (run again to resume from "
                      "the stages already cached)", highlight=False, soft_wrap=True)
    return code


def _usage_error(e: Exception) -> int | None:
    """The command line's own usage errors (an unknown option or command, a value of the wrong type) as one line;
    their exit code, or None for any other exception."""
    message, code = getattr(e, "format_message", None), getattr(e, "exit_code", None)
    if not callable(message) or not isinstance(code, int):
        return None
    text = str(message()).strip()
    if text:  # (no text: the help was shown, as for `edgebundle` alone)
        where = getattr(getattr(e, "ctx", None), "command_path", None) or "edgebundle"
        _error_line(f"{text} (see {where} --help)")
    return code


if __name__ == "__main__":
    main()
