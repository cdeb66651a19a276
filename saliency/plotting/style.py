"""Figure style: one colour, marker and line style per criterion key; paper sizes; PDF + PNG.

Nothing here touches matplotlib's global state at import time. Figures are built on
`matplotlib.figure.Figure` objects (no pyplot figure registry, no backend needed: Agg-safe) inside
`paper_style()`, a `matplotlib.rc_context`, so the caller's rcParams are restored afterwards.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

SINGLE_COLUMN = 3.25  # inches: one column of a two-column paper (ICML, NeurIPS-style 2-col, IEEE)
DOUBLE_COLUMN = 6.75  # inches: full text width of a two-column paper
DPI = 200

# Okabe-Ito / Tol colour-blind-safe colours; grey and black for the two references.
_KNOWN: dict[str, tuple[str, str, str]] = {
    "dense": ("#000000", "", "--"),
    "random": ("#8c8c8c", "x", ":"),
    "magnitude": ("#0072B2", "o", "-"),
    "obd": ("#D55E00", "s", "-"),
    "obs": ("#CC79A7", "D", "-"),
    "snip": ("#009E73", "^", "--"),
    "taylor": ("#E69F00", "v", "--"),
    "taylor_weight": ("#56B4E9", "<", "-."),
    "grasp": ("#882255", ">", "-."),
    "synflow": ("#332288", "P", ":"),
    "wanda": ("#999933", "X", "-."),
    "sparsegpt": ("#117733", "*", "-"),
    "obc": ("#661100", "h", "-"),
    "obs_channel": ("#AA4499", "p", "--"),
    "flap": ("#DDAA33", "v", "-"),
    "structured_obs": ("#CC3311", "D", "-"),
    "block_influence": ("#004488", "s", ":"),
}
# legend order: real criteria first, then the two references
ORDER = (
    "magnitude",
    "obd",
    "obs",
    "snip",
    "taylor",
    "taylor_weight",
    "grasp",
    "synflow",
    "obc",
    "sparsegpt",
    "wanda",
    "obs_channel",
    "flap",
    "structured_obs",
    "block_influence",
    "random",
    "dense",
)
# for criteria not listed above: Tol colours distinct from the known ones, picked by hash
_EXTRA_COLORS = (
    "#117733",
    "#999933",
    "#AA4499",
    "#661100",
    "#6699CC",
    "#DDAA33",
    "#004488",
    "#BB5566",
)
_MARKERS = ("o", "s", "D", "^", "v", "<", ">", "P", "X", "*", "h", "p")
_LINESTYLES = ("-", "--", "-.", ":")


def criterion_style(name: str, variant: int = 0) -> dict[str, str]:
    """`{"color", "marker", "linestyle"}` for a criterion key, the same in every figure.

    Unknown keys get a stable style derived from sha256 of the name (never Python's `hash()`,
    which is salted per process), so a third-party criterion keeps its colour across runs.
    variant > 0 (the same criterion with other hyperparameters): same colour, another line style
    and marker, hollow markers.
    """
    if name in _KNOWN:
        color, marker, ls = _KNOWN[name]
    else:
        h = hashlib.sha256(name.encode()).digest()
        color = _EXTRA_COLORS[h[0] % len(_EXTRA_COLORS)]
        marker = _MARKERS[h[3] % len(_MARKERS)]
        ls = _LINESTYLES[h[4] % len(_LINESTYLES)]
    if variant:
        ls = _LINESTYLES[(_LINESTYLES.index(ls) + variant) % len(_LINESTYLES)]
        marker = _MARKERS[(_MARKERS.index(marker) + variant) % len(_MARKERS)] if marker else ""
        return {
            "color": color,
            "marker": marker or "None",
            "linestyle": ls,
            "markerfacecolor": "white",
        }
    return {"color": color, "marker": marker or "None", "linestyle": ls}


def order_key(name: str) -> tuple:
    """Sort key putting known criteria in `ORDER`, unknown ones after them by name, refs last."""
    if name in ("random", "dense"):
        return (2, ORDER.index(name), name)
    return (0, ORDER.index(name), name) if name in ORDER else (1, 0, name)


def log_axis(ax, which: str = "x", *, ticks=None, fmt=None) -> None:
    """Log scale with plain-number tick labels (`fmt(value) -> str`, default '%g') that never
    collide: at `ticks` when given (at most 8), else at decades (plus 2 and 5 when the axis
    spans less than one decade); minor ticks unlabelled."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    if ticks is not None and 0 < len(ticks) <= 8:
        axis.set_major_locator(FixedLocator(sorted(ticks)))
    else:
        ax.autoscale_view()
        lo, hi = axis.get_view_interval()
        decades = np.log10(hi / lo) if lo > 0 and hi > lo else 99
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades < 0.8 else (1.0,)))
    fmt = fmt or (lambda v: f"{v:g}")
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    axis.set_minor_formatter(NullFormatter())


def rc_params(*, usetex: bool = False, font_size: float = 8.0) -> dict:
    """rcParams for print: 8 pt text, 7 pt ticks and legend, thin axes, embedded TrueType fonts."""
    small = font_size - 1
    return {
        "font.family": "serif" if usetex else "sans-serif",
        "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
        "mathtext.fontset": "dejavusans",
        "text.usetex": usetex,
        "font.size": font_size,
        "axes.titlesize": font_size,
        "axes.labelsize": font_size,
        "figure.titlesize": font_size,
        "xtick.labelsize": small,
        "ytick.labelsize": small,
        "legend.fontsize": small,
        "legend.title_fontsize": small,
        "legend.frameon": False,
        "legend.handlelength": 2.2,
        "axes.linewidth": 0.6,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.linewidth": 0.4,
        "grid.alpha": 0.5,
        "xtick.major.width": 0.6,
        "ytick.major.width": 0.6,
        "xtick.major.size": 2.5,
        "ytick.major.size": 2.5,
        "xtick.minor.size": 1.5,
        "ytick.minor.size": 1.5,
        "lines.linewidth": 1.2,
        "lines.markersize": 3.5,
        "patch.linewidth": 0.5,
        "savefig.dpi": DPI,
        "pdf.fonttype": 42,
        "ps.fonttype": 42,
    }


def paper_style(*, usetex: bool = False, font_size: float = 8.0):
    """Context manager applying `rc_params` (restores the caller's rcParams on exit)."""
    return matplotlib.rc_context(rc_params(usetex=usetex, font_size=font_size))


def fig_width(width: str | float) -> float:
    if width == "single":
        return SINGLE_COLUMN
    if width == "double":
        return DOUBLE_COLUMN
    if isinstance(width, (int, float)) and not isinstance(width, bool) and width > 0:
        return float(width)
    raise ValueError(
        f"width must be 'single', 'double' or a positive number of inches; got {width!r}"
    )


def new_figure(width: str | float, height: float, nrows: int = 1, ncols: int = 1, **kw):
    """A constrained-layout `Figure` (not registered with pyplot) and its axes array (2-D)."""
    fig = Figure(figsize=(fig_width(width), height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def save_figure(
    fig: Figure,
    out_dir: str | os.PathLike,
    stem: str,
    formats: Sequence[str] = ("png", "pdf"),
    caption: str | None = None,
) -> list[Path]:
    """Write `out_dir/stem.{png,pdf}` (PNG at 200 dpi, PDF vector), and `stem.txt` holding
    `caption` when given (what the marks mean, for the paper's caption); return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out / f"{stem}.{fmt}"
        fig.savefig(p, dpi=DPI, format=fmt, metadata=_metadata(fmt))
        paths.append(p)
    if caption:
        paths.append(out / f"{stem}.txt")
        paths[-1].write_text(caption.strip() + "\n")
    return paths


def _metadata(fmt: str) -> dict | None:
    # no creation date: identical inputs give byte-identical PDFs (diffable figures)
    return {"CreationDate": None} if fmt == "pdf" else None
