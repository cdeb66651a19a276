"""Sweep configs: a TOML file -> a validated, frozen `SweepConfig`.

Everything is checked before any work starts: an unknown key is an error that names the key and
lists the accepted ones; unknown criteria (and their hyperparameters), models, datasets and modes,
sparsities outside [0, 1) and a missing data directory are errors too. See `saliency/sweep/demo.toml`
for a commented example.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

MODES = ("oneshot", "finetune", "gradual", "iterative", "init")

# section -> {key: default}; None means "inherit" (finetune from train) or "computed"
TRAIN = {
    "epochs": 3,
    "batch_size": 64,
    "lr": 0.1,
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 0.0,
}
SECTIONS: dict[str, dict[str, Any]] = {
    "train": TRAIN,
    "finetune": {
        "epochs": 1,
        "batch_size": None,
        "lr": None,
        "optimizer": None,
        "momentum": None,
        "weight_decay": None,
        "steps": None,  # at most this many optimizer steps per fine-tuning (None: every epoch)
    },
    "gradual": {
        "start": "dense",  # "dense": from the trained dense model; "init": train from scratch
        "epochs": 2,
        "initial_sparsity": 0.0,
        "begin_step": 0,
        "end_step": None,
        "power": 3.0,
        "frequency": None,
    },
    "iterative": {"rounds": 3, "epochs_per_round": 1},
    "init": {"epochs": None},
    "scoring": {"n_samples": 1024, "batch_size": 256},
    "evaluate": {"n_samples": None},  # the first n test samples (None: all of them)
    "allocate": {"reduce": None, "block": None, "pooling": "avg", "max_layer_sparsity": None},
    "targets": {"include": None, "exclude": None, "keep_output_dense": False},
    # channel sweeps: allocate by dependency groups, compact each pruned model and record its
    # MACs, parameters and CPU latency against the dense model's (median of `repeats` forwards
    # of `batch_size` samples, both measured in the same process). Transformer granularities
    # (head, neuron, width, depth; a causal LM): compact_transformer, MACs per token, prefill
    # latency of `prefill_tokens` tokens and greedy decode speed over `decode_tokens` new ones,
    # one sequence, with each torch thread count of `threads` (units.compact_transformer_metrics)
    "compact": {
        "measure": False,
        "batch_size": 64,
        "repeats": 30,
        "prefill_tokens": 256,
        "decode_tokens": 32,
        "threads": [1, 2],
    },
}
# which [compact] keys apply to which granularities (the others must stay unset)
COMPACT_KEYS = {
    "channel": ("measure", "batch_size", "repeats"),
    "transformer": ("measure", "repeats", "prefill_tokens", "decode_tokens", "threads"),
}
TOP: dict[str, Any] = {
    "name": None,
    "model": None,
    "model_kwargs": {},
    "dataset": None,
    "data_root": None,
    "device": "cpu",
    "seeds": [0],
    "sparsities": None,
    "modes": ["oneshot"],
    "scope": "global",
    "granularity": "element",
    "criteria": None,
    "criterion_defaults": {},
    "exclude_criteria": [],
    "save_scores": False,
    "tensorboard": False,
    "imports": [],
    **{s: {} for s in SECTIONS},
}


class ConfigError(ValueError):
    """A sweep config is invalid; the message names the key and what is accepted."""


@dataclass(frozen=True)
class CriterionSpec:
    """One criterion of a sweep: registry name, hyperparameters as given, and a unique label."""

    name: str
    hparams: dict[str, Any] = field(default_factory=dict)
    label: str = ""


@dataclass(frozen=True)
class SweepConfig:
    name: str
    model: str
    dataset: str
    sparsities: tuple[float, ...]
    criteria: tuple[CriterionSpec, ...]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None
    device: str = "cpu"
    seeds: tuple[int, ...] = (0,)
    modes: tuple[str, ...] = ("oneshot",)
    scope: str = "global"
    granularity: str = "element"
    save_scores: bool = False
    tensorboard: bool = False
    imports: tuple[str, ...] = ()
    train: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    gradual: dict[str, Any] = field(default_factory=dict)
    iterative: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] = field(default_factory=dict)
    scoring: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=lambda: dict(SECTIONS["evaluate"]))
    allocate: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)
    compact: dict[str, Any] = field(default_factory=lambda: dict(SECTIONS["compact"]))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def config_hash(self) -> str:
        d = self.as_dict()
        d["finetune"] = finetune_settings(self)
        if self.evaluate.get("n_samples") is None:  # (hashes of configs without it hold)
            d.pop("evaluate")
        if self.compact.get("measure"):
            d["compact"] = compact_settings(self)
        else:  # hashes of configs written before [compact] hold
            d.pop("compact")
        return digest(d)


def is_transformer_granularity(granularity: str) -> bool:
    from saliency.structured import is_structured

    return is_structured(granularity)


def compact_settings(cfg: SweepConfig) -> dict[str, Any]:
    """The [compact] keys that apply to the sweep's granularity (`COMPACT_KEYS`): what its run
    ids hash, so that the keys added for transformers leave channel sweeps' run ids as they were."""
    kind = "transformer" if is_transformer_granularity(cfg.granularity) else "channel"
    return {k: v for k, v in cfg.compact.items() if k in COMPACT_KEYS[kind]}


def finetune_settings(cfg: SweepConfig) -> dict[str, Any]:
    """`cfg.finetune` less an unset `steps` (run ids of sweeps that do not set it are unchanged)."""
    return {k: v for k, v in cfg.finetune.items() if not (k == "steps" and v is None)}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any, n: int = 12) -> str:
    """First `n` hex chars of sha256 of canonical JSON (stable across processes, unlike hash())."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def _check_keys(table: Any, accepted: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        _fail(f"{where or 'config'} must be a table; got {table!r}")
    bad = sorted(set(table) - set(accepted))
    if bad:
        key = f"{where}.{bad[0]}" if where else bad[0]
        _fail(
            f"unknown key {key!r} in the sweep config; accepted{' in [' + where + ']' if where else ''}: "
            f"{', '.join(sorted(accepted))}"
        )
    return {**copy.deepcopy(accepted), **table}


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string: --set model=lenet5


def apply_overrides(
    raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """Apply `key=value` overrides (dotted keys, TOML values: `train.epochs=1`, `seeds=[0,1]`)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--set expects key=value (e.g. train.epochs=1); got {item!r}")
        *parents, last = key.strip().split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                _fail(f"--set {key}: {p!r} is not a table")
        node[last] = _parse_value(value.strip())
    return raw


def _criteria(raw: dict[str, Any]) -> tuple[CriterionSpec, ...]:
    from saliency.criteria import available_criteria, get_criterion

    entries = raw["criteria"]
    if entries is None:
        _fail('the sweep config needs `criteria`: a list of names, [[criteria]] tables, or "all"')
    defaults = raw["criterion_defaults"]
    if entries == "all":
        known = set(available_criteria(raw.get("granularity") or "element"))
        excluded = set(raw["exclude_criteria"])
        if excluded - set(available_criteria()):
            _fail(
                f"exclude_criteria names unknown criteria {sorted(excluded - set(available_criteria()))}; "
                f"available: {', '.join(available_criteria())}"
            )
        # defaults apply where the criterion has that field (criteria differ in their knobs)
        defaults = {
            n: {k: v for k, v in d.items() if k in _fields(n)}
            for n, d in defaults.items()
            if n in known
        }
        entries = sorted(known - excluded)
    if not isinstance(entries, list) or not entries:
        _fail(f'criteria must be a non-empty list or "all"; got {entries!r}')
    specs, labels = [], set()
    for i, e in enumerate(entries):
        e = {"name": e} if isinstance(e, str) else dict(e)
        if not isinstance(e.get("name"), str):
            _fail(f"criteria[{i}] needs a `name` (a registered criterion); got {e!r}")
        name, label = e.pop("name"), e.pop("label", None)
        hparams = {**defaults.get(name, {}), **e}
        try:
            get_criterion(name, **hparams)
        except (TypeError, ValueError) as err:
            _fail(f"criteria[{i}] ({name}): {err}")
        label = label or name
        if label in labels:
            _fail(
                f"criterion label {label!r} appears twice: give each repeated criterion a "
                "distinct `label`"
            )
        labels.add(label)
        specs.append(CriterionSpec(name, hparams, label))
    return tuple(specs)


def _fields(name: str) -> set[str]:
    from saliency.criteria import get_criterion

    crit = get_criterion(name)
    return {f.name for f in dataclasses.fields(crit)} if dataclasses.is_dataclass(crit) else set()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# (section, key) -> (predicate, what is accepted); None values (inherit / computed) are skipped
_RULES: dict[tuple[str, str], tuple[Callable[[Any], bool], str]] = {}
for _sec in ("train", "finetune"):
    _RULES.update({
        (_sec, "epochs"): (lambda v: _is_int(v) and v >= 0, "a non-negative int"),
        (_sec, "batch_size"): (lambda v: _is_int(v) and v >= 1, "a positive int"),
        (_sec, "lr"): (lambda v: _is_number(v) and v > 0, "a positive number"),
        (_sec, "optimizer"): (lambda v: v in ("sgd", "adam", "adamw"), "'sgd', 'adam' or 'adamw'"),
        (_sec, "momentum"): (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        (_sec, "weight_decay"): (lambda v: _is_number(v) and v >= 0, "a non-negative number"),
    })  # fmt: skip
_RULES[("finetune", "steps")] = (lambda v: _is_int(v) and v >= 1, "a positive int")
_RULES.update({
    ("gradual", "start"): (lambda v: v in ("dense", "init"), "'dense' or 'init'"),
    ("gradual", "epochs"): (lambda v: _is_int(v) and v >= 1, "a positive int"),
    ("gradual", "initial_sparsity"): (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("gradual", "begin_step"): (lambda v: _is_int(v) and v >= 0, "a non-negative int"),
    ("gradual", "end_step"): (lambda v: _is_int(v) and v >= 1, "a positive int"),
    ("gradual", "power"): (lambda v: _is_number(v) and v > 0, "a positive number"),
    ("gradual", "frequency"): (lambda v: _is_int(v) and v >= 1, "a positive int"),
    ("iterative", "rounds"): (lambda v: _is_int(v) and v >= 1, "a positive int"),
    ("iterative", "epochs_per_round"): (lambda v: _is_int(v) and v >= 0, "a non-negative int"),
    ("init", "epochs"): (lambda v: _is_int(v) and v >= 0, "a non-negative int"),
    ("scoring", "n_samples"): (lambda v: _is_int(v) and v >= 1, "a positive int"),
    ("scoring", "batch_size"): (lambda v: _is_int(v) and v >= 1, "a positive int"),
    ("evaluate", "n_samples"): (lambda v: _is_int(v) and v >= 1, "a positive int"),
    ("compact", "measure"): (lambda v: isinstance(v, bool), "true or false"),
    ("compact", "batch_size"): (lambda v: _is_int(v) and v >= 1, "a positive int"),
    ("compact", "repeats"): (lambda v: _is_int(v) and v >= 1, "a positive int"),
    ("compact", "prefill_tokens"): (lambda v: _is_int(v) and v >= 1, "a positive int"),
    ("compact", "decode_tokens"): (lambda v: _is_int(v) and v >= 2, "an int >= 2"),
    ("compact", "threads"): (
        lambda v: isinstance(v, list) and v and all(_is_int(t) and t >= 1 for t in v)
        and len(set(v)) == len(v), "a non-empty list of distinct positive ints"),
})  # fmt: skip


def _check_sections(sections: dict[str, dict[str, Any]]) -> None:
    """Training and schedule settings fail at parse time, before any model is trained."""
    for (sec, key), (ok, accepted) in _RULES.items():
        v = sections[sec][key]
        if v is not None and not ok(v):
            _fail(f"{sec}.{key} must be {accepted}; got {v!r}")
    g = sections["gradual"]
    if g["end_step"] is not None and g["end_step"] <= g["begin_step"]:
        _fail(
            f"gradual.end_step ({g['end_step']}) must be after gradual.begin_step ({g['begin_step']})"
        )


def _check_compact(given: dict[str, Any], compact: dict[str, Any], granularity: str) -> None:
    """[compact] measure needs a granularity whose units compaction removes; keys that do not
    apply to the granularity are refused rather than ignored."""
    if is_transformer_granularity(granularity):
        kind, what = "transformer", f"granularity {granularity!r} (compact_transformer)"
    elif granularity == "channel":
        kind, what = "channel", 'granularity "channel" (saliency.compact)'
    else:
        if compact["measure"]:
            _fail(
                'compact.measure removes pruned units: it needs granularity = "channel" or a '
                f"transformer granularity (head, neuron, width, depth); got {granularity!r}"
            )
        return
    bad = sorted(set(given) - set(COMPACT_KEYS[kind]))
    if bad:
        _fail(
            f"compact.{bad[0]} does not apply to {what}; its [compact] keys: "
            f"{', '.join(COMPACT_KEYS[kind])}"
        )


def _check_transformer(raw: dict[str, Any], sections: dict[str, dict[str, Any]]) -> None:
    """Heads, neurons, width, depth (`saliency.structured`): the scope and sparsities it takes,
    the modes the sweep runs it in, and no allocate or targets options (units are found from
    the model's data flow, not from the targets)."""
    from saliency.structured import check_structured

    g = raw["granularity"]
    for s in raw["sparsities"]:
        try:
            check_structured(s, raw["scope"], g)
        except ValueError as err:
            _fail(f"granularity {g!r}: {err}")
    other = [m for m in raw["modes"] if m not in ("oneshot", "finetune")]
    if other:
        _fail(f"granularity {g!r} runs modes oneshot and finetune; got {other}")
    for sec in ("allocate", "targets"):
        given = sorted(k for k, v in sections[sec].items() if v != SECTIONS[sec][k])
        if given:
            _fail(
                f"{sec}.{given[0]} does not apply to granularity {g!r}: its units (heads, "
                "neurons, blocks) are found from the model (saliency.structures); remove it"
            )


def _check_criterion_granularity(specs, granularity: str, sparsities) -> None:
    """Criteria that cannot score the sweep's transformer units are refused before any work:
    layer-wise solvers (they prune weights, not units), criteria with several scoring rounds,
    and criteria limited to other granularities (block_influence: depth only)."""
    if not is_transformer_granularity(granularity):
        return
    from saliency.criteria import get_criterion
    from saliency.layerwise import is_solver

    for spec in specs:
        crit = get_criterion(spec.name, **spec.hparams)
        allowed = getattr(crit, "granularities", None)
        why = None
        if is_solver(crit):
            why = "it is a layer-wise solver of weights"
        elif allowed is not None and granularity not in allowed:
            why = f"it scores only {', '.join(allowed)}"
        elif callable(getattr(crit, "schedule", None)) and any(
            list(crit.schedule(s)) != [s] for s in sparsities
        ):
            why = "it re-scores in rounds, which structured pruning does not do"
        if why:
            _fail(
                f"criterion {spec.label!r} cannot prune at granularity {granularity!r}: {why}; "
                "use an element criterion (magnitude, taylor_weight...) or a unit criterion "
                "(flap, structured_obs; block_influence for depth)"
            )


def parse_config(
    raw: dict[str, Any], *, name: str = "sweep", check_data: bool = True
) -> SweepConfig:
    """Validate a config mapping (as read from TOML) into a `SweepConfig`."""
    raw = _check_keys(raw, TOP, "")
    for mod in raw["imports"]:  # user modules that register criteria, models or datasets
        try:
            importlib.import_module(mod)
        except ImportError as err:
            _fail(f"imports: cannot import {mod!r}: {err}")
    sections = {s: _check_keys(raw[s], SECTIONS[s], s) for s in SECTIONS}
    for k, v in sections["finetune"].items():
        if v is None and k in TRAIN:
            sections["finetune"][k] = sections["train"][k]
    from saliency import zoo

    for key, avail in (("model", zoo.available_models()), ("dataset", zoo.available_datasets())):
        if raw[key] is None:
            _fail(
                f'the config names no {key}: add {key} = "..." (one of {", ".join(sorted(avail))})'
            )
        if raw[key] not in avail:
            _fail(f"unknown {key} {raw[key]!r}; available: {', '.join(sorted(avail))}")
    if (
        raw["data_root"] is not None
        and check_data
        and not Path(raw["data_root"]).expanduser().is_dir()
    ):
        _fail(
            f"data_root {raw['data_root']!r} is not a directory (it should hold the dataset's "
            f"files for {raw['dataset']!r})"
        )
    modes = raw["modes"]
    if not isinstance(modes, list) or not modes or any(m not in MODES for m in modes):
        _fail(f"modes must be a non-empty list from {', '.join(MODES)}; got {modes!r}")
    sp = raw["sparsities"]
    if not isinstance(sp, list) or not sp:
        _fail(f"sparsities must be a non-empty list of numbers in [0, 1); got {sp!r}")
    for s in sp:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            _fail(f"sparsities: {s!r} is outside [0, 1) (sparsity is the fraction of zeros)")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        _fail(f"seeds must be a non-empty list of ints; got {seeds!r}")
    if raw["scope"] not in ("global", "layer"):
        _fail(f"unknown scope {raw['scope']!r}; accepted: global, layer")
    _check_sections(sections)
    _check_compact(raw["compact"], sections["compact"], str(raw["granularity"]))
    if is_transformer_granularity(raw["granularity"]):
        _check_transformer(raw, sections)
    if sections["finetune"]["steps"] is not None and "gradual" in modes:
        _fail(
            "finetune.steps would cut gradual pruning's schedule short (it spans gradual.epochs); "
            "leave finetune.steps unset in a sweep with mode gradual"
        )
    block = sections["allocate"]["block"]
    if block is not None:
        sections["allocate"]["block"] = tuple(block)
    criteria = _criteria(raw)
    _check_criterion_granularity(criteria, str(raw["granularity"]), [float(s) for s in sp])
    return SweepConfig(
        name=str(raw["name"] or name),
        model=raw["model"],
        dataset=raw["dataset"],
        model_kwargs=dict(raw["model_kwargs"]),
        data_root=None if raw["data_root"] is None else os.fspath(raw["data_root"]),
        device=raw["device"],
        sparsities=tuple(sorted({float(s) for s in sp})),
        seeds=tuple(dict.fromkeys(seeds)),
        modes=tuple(dict.fromkeys(modes)),
        scope=raw["scope"],
        granularity=str(raw["granularity"]),
        criteria=criteria,
        save_scores=bool(raw["save_scores"]),
        tensorboard=bool(raw["tensorboard"]),
        imports=tuple(raw["imports"]),
        **sections,
    )


def load_config(
    path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()
) -> SweepConfig:
    """Read a TOML sweep config, apply `--set key=value` overrides, and validate it."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no sweep config at {p}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: invalid TOML: {err}") from None
    return parse_config(apply_overrides(raw, overrides), name=p.stem)
