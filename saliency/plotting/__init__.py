"""Publication figures and tables from sweep result records (and saved score files).

`build_all(results_dirs, out_dir)` writes every figure and table the records support and skips
the rest with a logged reason; each figure function is also usable on its own. Style: see
`saliency.plotting.style` (applied with `rc_context` inside each call, never at import).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from saliency.plotting.agreement import agreement, layer_sizes, plot_agreement
from saliency.plotting.bars import cost, layer_sparsity, plot_cost, plot_layer_sparsity
from saliency.plotting.curves import accuracy_vs_sparsity, measured, plot_accuracy_vs_sparsity
from saliency.plotting.loss import loss_prediction, plot_loss_prediction
from saliency.plotting.style import (
    DOUBLE_COLUMN,
    SINGLE_COLUMN,
    criterion_style,
    paper_style,
    rc_params,
    save_figure,
)
from saliency.plotting.tables import metric_table

log = logging.getLogger(__name__)


class FigureError(RuntimeError):
    """Some figures failed (`build_all(..., on_error="raise")`); `paths` holds what was written."""

    def __init__(self, message: str, paths: list[Path]):
        super().__init__(message)
        self.paths = paths


__all__ = [
    "DOUBLE_COLUMN",
    "FIGURES",
    "FigureError",
    "SINGLE_COLUMN",
    "accuracy_vs_sparsity",
    "agreement",
    "build_all",
    "cost",
    "layer_sparsity",
    "metric_table",
    "plot_agreement",
    "plot_cost",
    "plot_layer_sparsity",
    "criterion_style",
    "loss_prediction",
    "paper_style",
    "plot_accuracy_vs_sparsity",
    "plot_loss_prediction",
    "rc_params",
    "save_figure",
]


def build_all(
    results_dirs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    sparsity: float | None = None,
    band: str = "std",
    usetex: bool = False,
    only: Sequence[str] | None = None,
    table_sparsities: Sequence[float] | None = None,
    on_error: str = "log",
) -> list[Path]:
    """Every figure and table from the records in `results_dirs`; returns the files written.

    A figure the records cannot support (no scores saved, no OBD/OBS records, ...) is skipped
    with a logged reason. One that fails is logged with its error and the others are still
    built; then, with on_error="raise", `FigureError` names the failures. An output directory
    that cannot be written fails at once (OSError). Records of several configurations (see
    `saliency.sweep.records.config_groups`) give each configuration its own files.
    sparsity: the global sparsity for the per-layer and agreement figures (default: the
    recorded target closest to 0.9). only: names of the figures to build (`FIGURES`).
    table_sparsities: the table's columns (default: every recorded target, at most six).
    """
    from saliency.sweep.records import read_records

    unknown = set(only or ()) - set(FIGURES)
    if unknown:
        raise ValueError(f"unknown figure names {sorted(unknown)}; known: {list(FIGURES)}")
    if on_error not in ("log", "raise"):
        raise ValueError(f"on_error must be 'log' or 'raise'; got {on_error!r}")
    if isinstance(results_dirs, (str, os.PathLike)):
        results_dirs = [results_dirs]
    dirs = _results_dirs(results_dirs)
    records = read_records(*dirs)
    out = Path(out_dir)
    _check_writable(out)
    _log_configs(records)
    steps = _steps(
        records,
        dirs,
        out,
        sparsity=sparsity,
        band=band,
        usetex=usetex,
        table_sparsities=table_sparsities,
    )
    paths: list[Path] = []
    failed: list[str] = []
    for name, make in steps.items():
        if only and name not in only:
            continue
        try:
            got = make()
        except Exception as e:  # one broken figure must not stop the others
            failed.append(f"{name} ({type(e).__name__}: {e})")
            log.warning("figure %s failed: %s: %s", name, type(e).__name__, e)
            log.debug("figure %s failed", name, exc_info=True)
            continue
        if not got:
            log.info("figure %s: nothing written (see the reason logged above)", name)
        paths += got
    if failed and on_error == "raise":
        raise FigureError(f"{len(failed)} figure(s) failed: {'; '.join(failed)}", paths)
    return paths


def _check_writable(out: Path) -> None:
    """Fail before any figure is drawn when `out` cannot be created or written (OSError)."""
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
        pass


def _log_configs(records) -> None:
    from saliency.sweep.records import config_groups, config_slug

    groups = config_groups(records)
    if len(groups) > 1:
        log.warning(
            "the records hold %d configurations; each gets its own files: %s",
            len(groups),
            "; ".join(f"*{config_slug(label)}*: {label}" for label, _ in groups),
        )


def _results_dirs(given) -> list[Path]:
    """Directories holding records.jsonl: each given one, or the sweeps inside a parent
    directory (`saliency demo --out results` writes results/demo/). Missing ones are skipped
    with a warning; FileNotFoundError when none is left."""
    from saliency.sweep.records import records_path

    dirs: list[Path] = []
    for d in map(Path, given):
        if records_path(d).exists():
            dirs.append(d)
        elif d.is_dir() and (found := sorted(p.parent for p in d.glob("*/records.jsonl"))):
            log.info("%s holds no records.jsonl; using the sweeps in it: %s", d, found)
            dirs += found
        else:
            log.warning("no records at %s; skipped", d)
    if not dirs:
        raise FileNotFoundError(
            f"no records.jsonl in {[str(d) for d in given]} (nor in their subdirectories)"
        )
    return dirs


FIGURES = (
    "accuracy_vs_sparsity",
    "accuracy_vs_compression",
    "accuracy_vs_macs",
    "accuracy_vs_latency",
    "accuracy_vs_params",
    "accuracy_vs_prefill",
    "layer_sparsity",
    "agreement",
    "loss_prediction",
    "cost",
    "table",
)


def _steps(records, dirs, out, *, sparsity, band, usetex, table_sparsities):
    from saliency.plotting.data import pick_sparsity

    kw = {"usetex": usetex}
    s = sparsity
    if s is None:
        s = pick_sparsity(
            r.get("sparsity_target") for r in records if r.get("criterion") != "dense"
        )
    s = 0.9 if s is None else s

    def sizes():
        # model order and sizes from saved scores, when they unambiguously match the records
        models = {(r.get("dataset"), r.get("model")) for r in records}
        return layer_sizes([dirs[0] / "scores"]) if len(dirs) == 1 and len(models) <= 1 else None

    def agree():
        paths = []
        for d in dirs:
            stem = "agreement" + (f"_{d.name}" if len(dirs) > 1 else "")
            paths += agreement([d / "scores"], out, sparsity=s, stem=stem, **kw)
        return paths

    def measured_curve(x):
        if not any(measured(r, x) is not None for r in records):
            log.info("accuracy_vs_%s: no record carries the compacted model's %s; skipped", x, x)
            return []
        return accuracy_vs_sparsity(records, out, band=band, xaxis=x, **kw)

    return {
        "accuracy_vs_sparsity": lambda: accuracy_vs_sparsity(records, out, band=band, **kw),
        "accuracy_vs_compression": lambda: accuracy_vs_sparsity(
            records, out, band=band, xaxis="compression", **kw
        ),
        "accuracy_vs_macs": lambda: measured_curve("macs"),
        "accuracy_vs_latency": lambda: measured_curve("latency"),
        "accuracy_vs_params": lambda: measured_curve("params"),
        "accuracy_vs_prefill": lambda: measured_curve("prefill"),
        "layer_sparsity": lambda: layer_sparsity(
            records, out, sparsity=s, layer_sizes=sizes(), **kw
        ),
        "agreement": agree,
        "loss_prediction": lambda: loss_prediction(records, out, **kw),
        "cost": lambda: cost(records, out, sparsity=s, **kw),
        "table": lambda: metric_table(records, out, sparsities=table_sparsities),
    }
