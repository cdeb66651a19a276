"""Table: metric at chosen sparsities, mean +- std over seeds, best per column in bold, written
as LaTeX (booktabs) and Markdown. One row per criterion, one block of rows per mode."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from saliency.plotting import data as D

log = logging.getLogger(__name__)
DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)


def choose_sparsities(
    targets, wanted: Sequence[float] | None = None, at_most: int = 6
) -> list[float]:
    """`wanted` if given (only those recorded), else all recorded targets, or, when more than
    `at_most`, the ones closest to 0.5, 0.8, 0.9, 0.95, 0.98, 0.99."""
    ts = sorted({round(float(t), 6) for t in targets if D.finite(t) and t > 0})
    if wanted is not None:
        return [t for t in ts if any(abs(t - w) < 1e-6 for w in wanted)]
    if len(ts) <= at_most:
        return ts
    return sorted({min(ts, key=lambda t: abs(t - w)) for w in DEFAULT_SPARSITIES})


def _fmt(metric: str, mean: float, sd: float, n: int) -> tuple[str, str]:
    """(mean, std) strings: accuracy in percent with one decimal, others with 3 significant digits."""
    if metric == "accuracy":
        k = 100.0 if mean <= 1.0 else 1.0
        return f"{mean * k:.1f}", (f"{sd * k:.1f}" if n > 1 else "")
    return f"{mean:.3g}", (f"{sd:.2g}" if n > 1 else "")


def table_rows(records: Sequence[dict], metric: str, sparsities: Sequence[float]):
    """[(mode, [(label, [(mean_str, std_str, bold)])])], bold = best mean shown in its column."""
    recs = [r for r in records if r.get("criterion") != "dense" and r.get("metric") == metric]
    better = max if D.HIGHER_IS_BETTER.get(metric, True) else min
    blocks = []
    for mode in D.modes(recs):
        phase = D.phase_for(recs, mode)
        sel = [r for r in recs if r.get("mode") == mode and r.get("phase") == phase]
        rows = []
        for label, rs, _ in D.series(sel).values():
            cells = []
            for s in sparsities:
                vals = D.by_seed_mean(
                    r
                    for r in rs
                    if D.finite(r.get("sparsity_target")) and abs(r["sparsity_target"] - s) < 1e-6
                )
                m, sd, n = D.summarize(vals, "std")
                cells.append(_fmt(metric, m, sd, n) if n else ("", ""))
            rows.append([label, cells])
        for j in range(len(sparsities)):
            shown = [float(c[j][0]) for _, c in rows if c[j][0]]
            best = better(shown) if shown else None
            for row in rows:
                ms, ss = row[1][j]
                row[1][j] = (ms, ss, bool(ms) and float(ms) == best)
        blocks.append((mode, rows))
    return blocks


def _dense_text(dense: Sequence[dict], metric: str) -> str:
    m, sd, n = D.summarize(D.by_seed_mean(r for r in dense if r.get("metric") == metric), "std")
    if not n:
        return ""
    ms, ss = _fmt(metric, m, sd, n)
    return f"Dense baseline: {ms}" + (f" \u00b1 {ss}" if ss else "") + "."


def to_markdown(blocks, sparsities, metric, caption) -> str:
    head = "| criterion | " + " | ".join(f"s = {s:g}" for s in sparsities) + " |"
    lines = [f"**{caption}**", ""]
    for mode, rows in blocks:
        lines += [
            f"*{D.MODE_TITLES.get(mode, mode)}*",
            "",
            head,
            "|---|" + "---:|" * len(sparsities),
        ]
        for label, cells in rows:
            txt = [(f"{m} \u00b1 {s}" if s else m) for m, s, _ in cells]
            txt = [f"**{t}**" if b else t for t, (_, _, b) in zip(txt, cells, strict=True)]
            lines.append(f"| {label} | " + " | ".join(txt) + " |")
        lines.append("")
    return "\n".join(lines)


def _tex(s: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("%", r"\%"),
        ("&", r"\&"),
        ("#", r"\#"),
    ):
        s = s.replace(a, b)
    return s.replace("\u00b1", r"$\pm$")


def to_latex(blocks, sparsities, metric, caption, label="tab:" + "accuracy") -> str:
    k = len(sparsities)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{_tex(caption)}}}",
        rf"\label{{{label}}}",
        r"\begin{tabular}{l" + "c" * k + "}",
        r"\toprule",
        "Criterion & " + " & ".join(f"$s={s:g}$" for s in sparsities) + r" \\",
    ]
    for mode, rows in blocks:
        lines += [
            r"\midrule",
            rf"\multicolumn{{{k + 1}}}{{l}}{{\emph{{{_tex(D.MODE_TITLES.get(mode, mode))}}}}} \\",
        ]
        for name, cells in rows:
            txt = []
            for m, s, b in cells:
                m = rf"\textbf{{{m}}}" if b else m
                txt.append(f"{m} $\\pm$ {s}" if s else m)
            lines.append(f"{_tex(name)} & " + " & ".join(txt) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def metric_table(
    records: Sequence[dict],
    out_dir: str | os.PathLike,
    *,
    metric: str | None = None,
    sparsities: Sequence[float] | None = None,
    stem: str | None = None,
) -> list[Path]:
    """Write `table_<metric>.tex` and `.md` per setting; return the paths ([] with a logged reason)."""
    paths: list[Path] = []
    out = Path(out_dir)
    for suffix, recs, dense in D.split_settings(records):
        m = metric or D.default_metric(recs)
        cols = choose_sparsities(
            (r.get("sparsity_target") for r in recs if r.get("metric") == m), sparsities
        )
        blocks = table_rows(recs, m, cols) if cols else []
        if not blocks:
            log.info("table: no %r records at sparsities %s; skipped", m, sparsities)
            continue
        seeds = len({r.get("seed") for r in recs})
        unit = " (%)" if m == "accuracy" else ""
        cap = (
            f"Test {m}{unit} at sparsity s, mean \u00b1 std over {seeds} seed(s); best per "
            f"column in bold. {_dense_text(dense, m)}"
        ).strip()
        name = (stem or f"table_{m}") + suffix
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.tex").write_text(to_latex(blocks, cols, m, cap, label=f"tab:{name}"))
        (out / f"{name}.md").write_text(to_markdown(blocks, cols, m, cap))
        paths += [out / f"{name}.tex", out / f"{name}.md"]
    return paths
