"""Table: metric at chosen sparsities, mean +- std over seeds, written as LaTeX (booktabs) and
Markdown. One row per criterion, one block of rows per mode. The best mean of a column is bold
only when it is separated from every other one: its +-1 std interval over seeds does not overlap
theirs (so never with one seed); a difference inside the seed spread is not bolded."""

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


def separated(best: tuple[float, float, int], other: tuple[float, float, int]) -> bool:
    """Whether (mean, std, n) `best` stands apart from `other`: both have >= 2 seeds and their
    mean +- std intervals do not overlap."""
    (m1, s1, n1), (m2, s2, n2) = best, other
    return n1 > 1 and n2 > 1 and abs(m1 - m2) > s1 + s2


def table_rows(records: Sequence[dict], metric: str, sparsities: Sequence[float]):
    """[(mode, [(label, [(mean_str, std_str, bold)])])]; bold = the best mean of its column,
    where `separated` from every other criterion's."""
    recs = [r for r in records if r.get("criterion") != "dense" and r.get("metric") == metric]
    sign = 1.0 if D.HIGHER_IS_BETTER.get(metric, True) else -1.0
    blocks = []
    for mode in D.modes(recs):
        phase = D.phase_for(recs, mode)
        sel = [r for r in recs if r.get("mode") == mode and r.get("phase") == phase]
        rows, stats = [], []
        for label, rs, _ in D.series(sel).values():
            cells, row_stats = [], []
            for s in sparsities:
                vals = D.by_seed_mean(
                    r
                    for r in rs
                    if D.finite(r.get("sparsity_target")) and abs(r["sparsity_target"] - s) < 1e-6
                )
                m, sd, n = D.summarize(vals, "std")
                cells.append(_fmt(metric, m, sd, n) if n else ("", ""))
                row_stats.append((m, sd, n))
            rows.append([label, cells])
            stats.append(row_stats)
        for j in range(len(sparsities)):
            col = [(i, st[j]) for i, st in enumerate(stats) if st[j][2]]
            if len(col) < 2:
                best = None
            else:
                i_best, top = max(col, key=lambda c: sign * c[1][0])
                best = i_best if all(separated(top, o) for i, o in col if i != i_best) else None
            for i, row in enumerate(rows):
                ms, ss = row[1][j]
                row[1][j] = (ms, ss, i == best)
        blocks.append((mode, rows))
    return blocks


def _dense_text(dense: Sequence[dict], metric: str, modes: Sequence[str]) -> str:
    parts = []
    for mode in ("dense", *modes):
        rs = [r for r in dense if r.get("mode") == mode and r.get("metric") == metric]
        m, sd, n = D.summarize(D.by_seed_mean(rs), "std")
        if n:
            ms, ss = _fmt(metric, m, sd, n)
            what = (
                ""
                if mode == "dense"
                else f" (given the training of {D.MODE_SHORT.get(mode, mode)})"
            )
            parts.append(f"{ms}" + (f" \u00b1 {ss}" if ss else "") + what)
    return f"Dense baseline: {'; '.join(parts)}." if parts else ""


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
    for suffix, recs, dense, config in D.split_settings(records):
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
        bold = (
            "bold: the best mean of a column, where its \u00b11 std interval over seeds does not "
            "overlap any other criterion's (no bold where the best is within the seed spread)"
            if seeds > 1
            else "one seed: no spread to tell differences apart, so nothing is bold"
        )
        modes = [b[0] for b in blocks]
        cap = (
            f"Test {m}{unit} at sparsity s, mean \u00b1 std over {seeds} seed(s); {bold}. "
            f"{_dense_text(dense, m, modes)}{D.config_note(config)}"
        ).strip()
        name = (stem or f"table_{m}") + suffix
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.tex").write_text(to_latex(blocks, cols, m, cap, label=f"tab:{name}"))
        (out / f"{name}.md").write_text(to_markdown(blocks, cols, m, cap))
        paths += [out / f"{name}.tex", out / f"{name}.md"]
    return paths
