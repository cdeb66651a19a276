"""Grouping result records (flat dicts, see notes/records schema) into what figures plot.

Figures read only records and saved score files. A "setting" is one (dataset, model, scope,
granularity); a "series" is one criterion with one set of hyperparameters.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

MODE_ORDER = ("oneshot", "finetune", "iterative", "gradual", "init")
MODE_TITLES = {
    "oneshot": "One-shot (no retraining)",
    "finetune": "One-shot + fine-tuning",
    "iterative": "Iterative",
    "gradual": "Gradual",
    "init": "At initialization + training",
}
MODE_SHORT = {
    "oneshot": "one-shot",
    "finetune": "one-shot + fine-tuning",
    "iterative": "iterative",
    "gradual": "gradual",
    "init": "at initialization",
}
METRIC_LABELS = {
    "perplexity": "Test perplexity",
    "accuracy": "Test accuracy (%)",
    "mse": "Test MSE",
    "loss": "Test loss",
}
HIGHER_IS_BETTER = {"perplexity": False, "accuracy": True, "mse": False, "loss": False}
BANDS = ("std", "ci95")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def default_metric(records: Iterable[dict]) -> str | None:
    """'perplexity' for language models (sequence targets), 'accuracy' for other classification
    sweeps, 'mse' for regression, else 'loss'; None if no records."""
    metrics = {r.get("metric") for r in records}
    for m in ("perplexity", "accuracy", "mse", "loss"):
        if m in metrics:
            return m
    return None


def scale(metric: str, values: Sequence[float]) -> tuple[np.ndarray, float]:
    """Accuracy stored as a fraction is shown in percent; other metrics unchanged."""
    v = np.asarray(values, dtype=float)
    k = 100.0 if metric == "accuracy" and v.size and np.nanmax(v) <= 1.0 else 1.0
    return v * k, k


def summarize(values: Sequence[float], band: str = "std") -> tuple[float, float, int]:
    """(mean, band half-width, n) over seeds. band: 'std' (sample std, ddof=1) or 'ci95'
    (Student-t 95% confidence interval of the mean). A single seed has zero width."""
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS}; got {band!r}")
    v = np.asarray([x for x in values if finite(x)], dtype=float)
    n = v.size
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(v[0]), 0.0, 1
    sd = float(v.std(ddof=1))
    if band == "std":
        return float(v.mean()), sd, n
    from scipy.stats import t  # scipy is a dev/extra dependency; only needed for CI bands

    return float(v.mean()), float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n), n


def setting_key(r: dict) -> tuple:
    return (r.get("dataset"), r.get("model"), r.get("scope"), r.get("granularity"))


def split_settings(records: Sequence[dict]) -> list[tuple[str, list[dict], list[dict], str]]:
    """[(stem suffix, pruned records, dense records, configuration label)], one per
    configuration (`records.config_groups`: records made with different settings are never
    drawn together) and setting (dataset, model, scope, granularity). The suffix names only
    what differs ('' when there is one of each); the label names the settings that differ
    between configurations ('' when there is one)."""
    from saliency.sweep.records import config_groups, config_slug

    out = []
    for config, members in config_groups(list(records)):
        pruned = defaultdict(list)
        for r in members:
            if r.get("criterion") != "dense":
                pruned[setting_key(r)].append(r)
        keys = sorted(pruned, key=lambda k: tuple(str(x) for x in k))
        varying = [i for i in range(4) if len({k[i] for k in keys}) > 1]
        for k in keys:
            dense = [
                r
                for r in members
                if r.get("criterion") == "dense" and (r.get("dataset"), r.get("model")) == k[:2]
            ]
            suffix = config_slug(config) + "".join(f"_{k[i]}" for i in varying)
            suffix = re.sub(r"[^A-Za-z0-9._-]", "-", suffix)  # "2:4" is no file name on Windows
            out.append((suffix, pruned[k], dense, config))
    return out


def dense_for(dense: Sequence[dict], mode: str) -> list[dict]:
    """The dense baseline of a panel: the dense model given the same training as the mode's
    pruned models (records of criterion 'dense' in that mode) where recorded, else the trained
    dense model (mode 'dense'; it has the same budget in one-shot mode)."""
    same = [r for r in dense if r.get("mode") == mode]
    return same or [r for r in dense if r.get("mode") in ("dense", None)]


def config_note(config: str) -> str:
    """Caption sentence naming a configuration ('' for the only one)."""
    if not config:
        return ""
    return (
        f" Configuration: {config} (the records hold results of several configurations; "
        "each has its own files)."
    )


def config_title(fig, config: str) -> None:
    """Name the configuration at the top of a figure (below a title it already has)."""
    if config:
        old = fig.get_suptitle()
        fig.suptitle("\n".join(t for t in (old, f"Configuration: {config}") if t))


def hparams_key(r: dict) -> str:
    return json.dumps(r.get("hparams") or {}, sort_keys=True, default=str)


def series(records: Sequence[dict]) -> dict[tuple[str, str], tuple[str, list[dict], dict]]:
    """{(criterion, variant key): (legend label, records, style)} in a stable order (known
    criteria in the style order, unknown ones by name, random last).

    Records with a `label` (the sweep's unique name for a criterion + hyperparameters) are grouped
    and shown by it; otherwise by hyperparameters, shown only when one criterion appears with
    several settings of them. A criterion's second, third... variant keeps its colour but gets
    another line style and hollow markers.
    """
    from saliency.plotting.style import criterion_style, order_key

    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        v = f"label:{r['label']}" if r.get("label") else hparams_key(r)
        groups[(r.get("criterion", "?"), v)].append(r)
    by_crit = defaultdict(list)
    for c, v in sorted(groups, key=lambda k: (order_key(k[0]), k[1])):
        by_crit[c].append(v)
    out = {}
    for c, v in sorted(groups, key=lambda k: (order_key(k[0]), k[1])):
        variants = by_crit[c]
        if v.startswith("label:"):
            label = v[len("label:") :]
        elif len(variants) > 1:
            hp = json.loads(v)
            others = [json.loads(x) for x in variants if x != v and not x.startswith("label:")]
            keys = sorted(set(hp).union(*others))
            diff = {
                k: hp.get(k, "default") for k in keys if any(o.get(k) != hp.get(k) for o in others)
            }
            label = f"{c} (" + ", ".join(f"{k}={x}" for k, x in diff.items()) + ")"
        else:
            label = c
        out[(c, v)] = (label, groups[(c, v)], criterion_style(c, variants.index(v)))
    return out


def modes(records: Iterable[dict]) -> list[str]:
    present = {r.get("mode") for r in records if r.get("mode") not in (None, "dense")}
    return [m for m in MODE_ORDER if m in present] + sorted(present - set(MODE_ORDER), key=str)


def phase_for(records: Sequence[dict], mode: str) -> str:
    """The phase a mode is judged at: 'final' (after training) when recorded, else 'pruned'."""
    phases = {r.get("phase") for r in records if r.get("mode") == mode}
    return "final" if "final" in phases else "pruned"


def by_seed_mean(records: Iterable[dict], key: str = "value") -> list[float]:
    """One value per seed (duplicates of a seed, e.g. a resumed run, averaged)."""
    per_seed = defaultdict(list)
    for r in records:
        if finite(r.get(key)):
            per_seed[r.get("seed")].append(float(r[key]))
    return [float(np.mean(v)) for _, v in sorted(per_seed.items(), key=lambda kv: str(kv[0]))]


def curve(records: Iterable[dict], band: str = "std"):
    """x (sparsity targets), mean, half-width, n per point over seeds."""
    at = defaultdict(list)
    for r in records:
        if finite(r.get("sparsity_target")):
            at[round(float(r["sparsity_target"]), 6)].append(r)
    xs = sorted(at)
    stats = [summarize(by_seed_mean(at[x]), band) for x in xs]
    return (
        np.array(xs),
        np.array([s[0] for s in stats]),
        np.array([s[1] for s in stats]),
        np.array([s[2] for s in stats]),
    )


def pick_sparsity(targets: Iterable[float], prefer: float = 0.9) -> float | None:
    """The recorded target sparsity closest to `prefer` (ties: the higher one)."""
    ts = sorted({round(float(t), 6) for t in targets if finite(t) and t > 0})
    if not ts:
        return None
    return min(ts, key=lambda t: (abs(t - prefer), -t))
