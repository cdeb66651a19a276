"""The pieces of a sweep unit: its run id, data, models (dense cache), pruning with cost, records.

Everything here runs in any process from picklable inputs (`SweepConfig`, `Job`, a directory);
`jobs.py` strings them together per mode.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import saliency
from saliency import distributed
from saliency.criteria import Cost, for_granularity, get_criterion
from saliency.layerwise import is_solver
from saliency.masks import Masks
from saliency.model_io import Batch, forward
from saliency.prune import prune_step, score
from saliency.sweep.config import (
    CriterionSpec,
    SweepConfig,
    compact_settings,
    digest,
    finetune_settings,
    is_transformer_granularity,
)

_DATA: dict[tuple, Any] = {}  # per-process cache of loaded datasets


@dataclass(frozen=True)
class Unit:
    run_id: str
    mode: str
    sparsity: float


@dataclass(frozen=True)
class Job:
    """`kind` "dense" (train and cache the dense model of `seed`), "baseline" (the dense model
    given a mode's extra training, see `dense_budget`), "oneshot" (one scoring pass for every
    oneshot/finetune unit of a criterion and seed), or "gradual"/"iterative"/"init" (one unit
    each)."""

    kind: str
    seed: int
    criterion: CriterionSpec | None = None
    units: tuple[Unit, ...] = field(default_factory=tuple)


def dataset(cfg: SweepConfig):
    from saliency import zoo

    key = (cfg.dataset, cfg.data_root)
    if key not in _DATA:
        _DATA[key] = zoo.get_dataset(cfg.dataset, data_root=cfg.data_root, seed=0)
    return _DATA[key]


def loss_fn_for(task: str) -> Callable:
    if task == "lm":
        from saliency.model_io import causal_lm_loss

        return causal_lm_loss
    if task == "regression":
        return lambda out, y: torch.nn.functional.mse_loss(out.reshape(y.shape), y.to(out.dtype))
    return torch.nn.functional.cross_entropy


def dense_key(cfg: SweepConfig, seed: int) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "dataset": cfg.dataset,
        "train": cfg.train,
        "seed": seed,
    }


AXES = ("seed", "mode", "criterion", "label", "hparams", "sparsity")  # a unit's place in the sweep


def unit_config(
    cfg: SweepConfig, seed: int, mode: str, spec: CriterionSpec | None, s: float
) -> dict[str, Any]:
    """What determines a unit's result, nothing else: its run id hashes this, and its records
    carry it, less the `AXES`, as `settings`."""
    unit = {**dense_key(cfg, seed), "mode": mode}
    if spec is not None:
        unit.update(
            criterion=spec.name,
            label=spec.label,  # two labelled lines are two sets of records, even where equal
            # every field, defaults included: a changed default is a different experiment
            hparams=hparams_of(build_criterion(spec, seed, cfg.granularity)),
            sparsity=s,
            scope=cfg.scope,
            granularity=cfg.granularity,
            allocate=cfg.allocate,
            targets=cfg.targets,
            scoring=cfg.scoring,
        )
    if mode in ("finetune", "iterative") or (mode == "gradual" and spec is None):
        unit["finetune"] = finetune_settings(cfg)  # (a gradual unit's run id predates this key)
    if mode in ("gradual", "iterative", "init"):
        unit[mode] = getattr(cfg, mode)
    if cfg.compact["measure"]:  # (run ids of sweeps that do not measure are unchanged)
        unit["compact"] = compact_settings(cfg)
    if cfg.evaluate["n_samples"] is not None:  # (nor are those of sweeps that test on all)
        unit["evaluate"] = cfg.evaluate
    return unit


def unit_run_id(
    cfg: SweepConfig, seed: int, mode: str, spec: CriterionSpec | None, s: float
) -> str:
    """sha256 of the unit's canonical config (`unit_config`)."""
    return digest(unit_config(cfg, seed, mode, spec, s))


def settings_of(cfg: SweepConfig, job: Job, unit: Unit) -> dict[str, Any]:
    full = unit_config(cfg, job.seed, unit.mode, job.criterion, unit.sparsity)
    if unit.mode == "gradual":  # trains with the finetune settings, though its run id omits them
        full.setdefault("finetune", finetune_settings(cfg))
    return json.loads(json.dumps({k: v for k, v in full.items() if k not in AXES}, default=str))


def new_model(cfg: SweepConfig, seed: int) -> torch.nn.Module:
    from saliency import zoo

    ds = dataset(cfg)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        return zoo.get_model(
            cfg.model, input_shape=ds.input_shape, num_classes=ds.num_classes, **cfg.model_kwargs
        )


def device(cfg: SweepConfig) -> torch.device:
    from saliency.sweep.train import resolve_device

    return resolve_device(cfg.device)


def train_model(cfg, model, seed, settings, *, on_step=None, notify=None) -> None:
    """Train with one section's settings (a fine-tuning's `steps`, if set, caps its optimizer
    steps); `notify(("loss", mean loss))` after every epoch."""
    from saliency.sweep.train import train

    ds = dataset(cfg)
    keys = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay")
    on_epoch = None if notify is None else (lambda _epoch, loss: notify(("loss", loss)))
    train(
        model,
        ds.train,
        **{k: settings[k] for k in keys},
        seed=seed,
        device=device(cfg),
        task=ds.task,
        on_step=on_step,
        on_epoch=on_epoch,
        max_steps=settings.get("steps"),
    )


def cache_path(cfg: SweepConfig, out: Path, seed: int) -> Path:
    return out / "cache" / f"dense-seed{seed}-{digest(dense_key(cfg, seed))}.pt"


def dense_model(cfg: SweepConfig, out: Path, seed: int, notify=None) -> torch.nn.Module:
    """The trained dense model of `seed`, from the cache, or trained now and cached atomically."""
    from saliency.sweep.records import atomic_write

    path = cache_path(cfg, out, seed)
    model = new_model(cfg, seed)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    elif distributed.is_writer():  # under torchrun rank 0 trains, the others receive its weights
        train_model(cfg, model, seed, cfg.train, notify=notify)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    model = model.to(device(cfg))
    distributed.broadcast_module(model)  # torchrun: every rank prunes rank 0's dense model
    return model


def dense_budget(cfg: SweepConfig, mode: str) -> tuple[str, list[dict[str, Any]]] | None:
    """(start, training rounds) that give the dense baseline of `mode` the training its pruned
    models get: start "dense" (the trained dense model) or "init" (a fresh one), then each round
    of settings in turn. None where the dense model itself has that budget (oneshot; init
    training as long as the dense model's)."""
    ft = cfg.finetune
    if mode == "finetune":
        return "dense", [ft]
    if mode == "iterative":
        return "dense", [{**ft, "epochs": cfg.iterative["epochs_per_round"]}] * cfg.iterative[
            "rounds"
        ]
    if mode == "gradual":
        return cfg.gradual["start"], [{**ft, "epochs": cfg.gradual["epochs"]}]
    if mode == "init" and cfg.init["epochs"] not in (None, cfg.train["epochs"]):
        return "init", [{**cfg.train, "epochs": cfg.init["epochs"]}]
    return None


def scoring_data(cfg: SweepConfig, seed: int) -> DataLoader:
    """The first `scoring.n_samples` training samples of a seeded permutation (under torchrun,
    this rank's share of them: the criteria combine the shares)."""
    x, y = dataset(cfg).train.tensors[:2]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[: cfg.scoring["n_samples"] or len(x)]
    if distributed.world() is not None:  # torchrun: each rank scores a contiguous run of the
        rank, size = distributed.world()  # very batches one process would read
        chunks = idx.split(cfg.scoring["batch_size"])
        lo, hi = distributed.shares(len(chunks))[rank]
        idx = torch.cat(chunks[lo:hi]) if hi > lo else idx[:0]
    return DataLoader(TensorDataset(x[idx], y[idx]), batch_size=cfg.scoring["batch_size"])


def targets(cfg: SweepConfig, model) -> dict[str, torch.nn.Parameter]:
    return saliency.prunable_parameters(model, **cfg.targets)


def example_inputs(cfg: SweepConfig, n: int = 8) -> torch.Tensor:
    """The first `n` test inputs: what channel groups are traced on and compact checks with."""
    return dataset(cfg).test.tensors[0][:n].to(device(cfg))


def calibration_example(cfg: SweepConfig, seed: int, n: int = 2) -> torch.Tensor:
    """The inputs of the first `n` scoring samples (token windows `[n, T]` of an LM): what a
    transformer's units are found on (`saliency.find_structure`) and compaction is checked on."""
    x = dataset(cfg).train.tensors[0]
    g = torch.Generator().manual_seed(seed)  # scoring_data's permutation: its first samples
    idx = torch.randperm(len(x), generator=g)[:n]
    return x[idx].to(device(cfg))


def structured(cfg: SweepConfig) -> bool:
    """Does the sweep prune transformer units (head, neuron, width, depth)?"""
    return is_transformer_granularity(cfg.granularity)


def allocate_kwargs(cfg: SweepConfig, model) -> dict[str, Any]:
    """`cfg.allocate`, plus the model's channel groups where the sweep compacts (`[compact]
    measure`): tied channels pruned together, their biases and BatchNorm zeroed with them.
    Transformer units allocate by `saliency.structured` (no allocate options): empty."""
    if structured(cfg):
        return {}
    if not cfg.compact["measure"]:
        return dict(cfg.allocate)
    groups = saliency.channel_groups(model, example_inputs(cfg), params=targets(cfg, model))
    return {**cfg.allocate, "groups": groups}


def kept_masks(cfg: SweepConfig, model, masks: Masks) -> Masks:
    """The masks to attach for training after pruning: `masks`, and where the sweep compacts,
    the biases and BatchNorm of the pruned channels, so that they stay zero (removable)."""
    from saliency.prune import owned_masks

    if structured(cfg):  # the units' masks hold their in rows, biases and out columns already
        return masks
    owned = owned_masks(model, masks, allocate_kwargs(cfg, model).get("groups"))
    return Masks({**masks, **owned}) if owned is not None else masks


def build_criterion(spec: CriterionSpec, seed: int, granularity: str = "element"):
    """The criterion of `spec` for the sweep's `seed`. A criterion with a `seed` field that the
    config leaves unset takes the sweep seed, so that each seed of a sweep draws anew (the
    `random` baseline would otherwise prune the same weights for every seed); one with a `per`
    field follows the sweep's granularity (`for_granularity`)."""
    crit = get_criterion(spec.name, **for_granularity(spec.name, spec.hparams, granularity))
    if (
        "seed" not in spec.hparams
        and dataclasses.is_dataclass(crit)
        and "seed" in {f.name for f in dataclasses.fields(crit)}
    ):
        crit = dataclasses.replace(crit, seed=seed)
    return crit


def hparams_of(crit) -> dict[str, Any]:
    if not dataclasses.is_dataclass(crit):
        return {}
    raw = {f.name: getattr(crit, f.name) for f in dataclasses.fields(crit)}
    return json.loads(json.dumps(raw, default=str))


def prune_with_cost(
    cfg, model, crit, sparsity, data, loss_fn, *, current=None, scores=None, structure=None
):
    """Score -> allocate -> update -> apply over the criterion's rounds (or with given `scores`).

    Returns (masks, cost summed over rounds, predictions or None). For `loss_units` criteria the
    predictions are {"scores": the scores of the newly pruned entries, summed round by round},
    plus what the criterion's own `loss_predictions(weights, masks, scores)` gives (OBS: the
    "joint" quadratic 1/2 w_Q^T (Hinv_QQ)^-1 w_Q and the "single" one-weight sum), also per round.
    """
    if structured(cfg):
        if current is not None:
            raise ValueError("transformer units are pruned once (modes oneshot and finetune)")
        return prune_units(
            cfg, model, crit, sparsity, data, loss_fn, scores=scores, structure=structure
        )
    params = targets(cfg, model)
    alloc = allocate_kwargs(cfg, model)
    if is_solver(crit):  # OBC, SparseGPT, Wanda: masks and updates solved on `data`, no scores
        start = time.perf_counter()
        masks = prune_step(model, crit, params, None, sparsity, current=current, data=data,
                           scope=cfg.scope, granularity=cfg.granularity, **alloc)  # fmt: skip
        return masks, Cost(seconds=time.perf_counter() - start, backward_passes=0), None
    rounds = crit.schedule(sparsity) if callable(getattr(crit, "schedule", None)) else [sparsity]
    if scores is not None:
        rounds = [sparsity]
    total, predicted, masks = Cost(backward_passes=0), {"scores": 0.0}, current
    own = getattr(crit, "loss_predictions", None)
    for s in rounds:
        sc = scores if scores is not None else score(model, crit, data, loss_fn, params=params)
        before = masks
        scored = {n: p.detach().clone() for n, p in params.items()} if callable(own) else None
        masks = prune_step(
            model,
            crit,
            params,
            sc,
            s,
            current=masks,
            scope=cfg.scope,
            granularity=cfg.granularity,
            **alloc,
        )
        if scores is None:
            total.add(sc.cost)
        for n, keep in masks.items():
            new = ~keep if before is None else before[n] & ~keep
            predicted["scores"] += float(sc[n][new.to(sc[n].device)].double().sum())
        if scored is not None:
            for k, v in own(scored, masks, sc).items():
                predicted[k] = predicted.get(k, 0.0) + v
    if masks is None:  # an empty schedule: nothing pruned
        masks = Masks.ones_like(params)
    if scores is not None:
        total = scores.cost
    return masks, total, predicted if getattr(crit, "loss_units", False) else None


def needs_element_scores(crit, granularity: str) -> bool:
    """Does pruning transformer units with `crit` read its element scores? Not where it scores
    units itself (`unit_scores`: FLAP, structured OBS) or, at depth, blocks (`block_scores`)."""
    if granularity == "depth" and callable(getattr(crit, "block_scores", None)):
        return False
    return not callable(getattr(crit, "unit_scores", None))


def prune_units(cfg, model, crit, sparsity, data, loss_fn, *, scores=None, structure=None):
    """Heads, neurons or blocks of a transformer (`saliency.structured.prune_structured`, the
    sweep's scope and granularity), masks applied (not attached); returns (masks, cost, None).

    `scores`: element scores of the dense model, shared by every sparsity (its cost is the
    unit's); a criterion that scores units itself (FLAP, structured OBS) scores, allocates and
    updates here, and its cost is the wall time of that. `structure`: `find_structure`'s units
    (found on `data`'s first batch when None)."""
    from saliency.structured import prune_structured

    spent = Cost(backward_passes=0)

    def score_elements(weights):
        if scores is not None and all(n in scores for n in weights):
            return {n: scores[n] for n in weights}
        sc = score(model, crit, data, loss_fn, params=weights)
        spent.add(sc.cost)
        return sc

    start = time.perf_counter()
    masks, _ = prune_structured(model, crit, sparsity, data, scope=cfg.scope,
                                granularity=cfg.granularity, score_elements=score_elements,
                                structure=structure)  # fmt: skip
    masks = Masks(masks)
    masks.apply(model)
    if scores is not None and needs_element_scores(crit, cfg.granularity):
        return masks, scores.cost, None
    spent.seconds = time.perf_counter() - start
    return masks, spent, None


def evaluate_model(
    cfg: SweepConfig, model, *, scoring: DataLoader | None = None
) -> dict[str, float]:
    """Test metrics (on the first `[evaluate] n_samples` test samples, if set); with `scoring`
    (a `scoring_data` loader), also "scoring_loss": the training loss on the samples the
    criteria score with, where OBD/OBS predict their loss increase."""
    from saliency.sweep.train import evaluate

    ds = dataset(cfg)
    test, n = ds.test, cfg.evaluate["n_samples"]
    if n is not None:
        test = TensorDataset(*(t[:n] for t in test.tensors))
    out = {k: float(v) for k, v in evaluate(model, test, task=ds.task, device=device(cfg)).items()}
    if scoring is not None:
        seen = evaluate(model, scoring.dataset, task=ds.task, device=device(cfg))
        loss = float(seen["loss"] if "loss" in seen else seen["mse"])
        if distributed.world() is not None:  # torchrun: this rank's share, combined by counts
            total, n = distributed.sum_counts(loss * len(scoring.dataset), len(scoring.dataset))
            loss = total / n
        out["scoring_loss"] = loss
    return out


def loss_gradient(model, data, loss_fn) -> dict[str, torch.Tensor]:
    """Gradient of the mean loss over `data` at `model` in eval mode (as `scoring_loss` is
    measured), on a copy: the first-order term ``g . dw`` that OBD and OBS assume to be zero."""
    m = copy.deepcopy(model).eval()
    dev = next(m.parameters()).device
    total, grads = 0, {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for raw in data:
        batch = Batch.of(raw).to(dev)
        m.zero_grad(set_to_none=True)
        (loss_fn(forward(m, batch), batch.targets) * len(batch)).backward()
        for n, p in m.named_parameters():
            if p.grad is not None:
                grads[n] += p.grad
        total += len(batch)
    grads = distributed.all_reduce_dict(grads)  # under torchrun: every rank's share
    (total,) = distributed.sum_counts(total)
    return {n: g / total for n, g in grads.items()}


def first_order_change(grads: dict[str, torch.Tensor], dense, pruned) -> float:
    """``g . (w_pruned - w_dense)`` over every parameter (OBS's compensation included)."""
    after = dict(pruned.named_parameters())
    total = 0.0
    for n, p in dense.named_parameters():
        total += float((grads[n] * (after[n].detach() - p.detach())).double().sum())
    return total


SPLIT_OF = {"scoring_loss": "scoring"}  # metrics not measured on the test set


def make_records(
    cfg,
    job: Job,
    unit: Unit,
    model,
    masks: Masks,
    phases: dict[str, dict],
    *,
    cost: Cost | None,
    predicted: dict[str, float] | None,
    first_order: float | None = None,
) -> list[dict[str, Any]]:
    """The tidy records of one unit (one per phase and metric), per /work/notes/records.md."""
    from saliency.sweep.metrics import count_flops, gzip_size, params_count

    ds = dataset(cfg)
    plain = model
    if saliency.attached_masks(model) is not None:
        plain = saliency.remove(copy.deepcopy(model))
    flops_dense, flops_nonzero = count_flops(plain, ds.input_shape)
    total, remaining = params_count(plain, masks)
    spec = job.criterion
    crit = build_criterion(spec, job.seed, cfg.granularity) if spec else None
    base = {
        "run_id": unit.run_id,
        "sweep": cfg.name,
        "config_hash": cfg.config_hash,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "task": ds.task,
        "criterion": spec.name if spec else "dense",
        "label": spec.label if spec else "dense",
        "hparams": hparams_of(crit) if crit else {},
        "seed": job.seed,
        "mode": unit.mode,
        "scope": cfg.scope,
        "granularity": cfg.granularity,
        "sparsity_target": unit.sparsity,
        "sparsity": masks.sparsity,
        "layer_sparsity": masks.layer_sparsity(),
        "split": "test",
        "params_total": total,
        "params_remaining": remaining,
        "flops_dense": flops_dense,
        "flops_nonzero": flops_nonzero,
        "gzip_bytes": gzip_size(plain),
        "score_seconds": cost.seconds if cost else None,
        "score_samples": cost.samples if cost else None,
        "score_backward_passes": cost.backward_passes if cost else None,
        "predicted_loss_increase": predicted["scores"] if predicted else None,
        "predicted_joint": predicted.get("joint") if predicted else None,
        "predicted_single": predicted.get("single") if predicted else None,
        "predicted_first_order": first_order,
        **collapse_facts(cfg, plain, masks),
        "settings": settings_of(cfg, job, unit),
        "threads": torch.get_num_threads(),  # changes losses in the last digits
        "time": time.time(),
        "saliency_version": saliency.__version__,
    }
    if cfg.compact["measure"]:
        base.update(compact_metrics(cfg, job.seed, plain))
    base["unit_records"] = sum(len(metrics) for metrics in phases.values())
    return [
        {**base, "phase": phase, "metric": m, "value": v, "split": SPLIT_OF.get(m, "test")}
        for phase, metrics in phases.items()
        for m, v in metrics.items()
    ]


def collapse_facts(cfg: SweepConfig, model, masks: Masks) -> dict[str, Any]:
    """What `saliency.prune` warns about (`saliency.collapse`), as record fields:
    `emptied_layers`, the targets whose every weight is pruned, and `input_connected`, whether
    the model's output changes when its test inputs are perturbed (False: every path from input
    to output is cut; None where it cannot be checked: token inputs). Records written before
    these fields existed lack them: read them with ``r.get("emptied_layers")``."""
    from saliency.collapse import emptied, input_disconnected

    x, y = dataset(cfg).test.tensors[:2]
    cut = input_disconnected(model, [(x[:8].to(device(cfg)), y[:8].to(device(cfg)))])
    return {"emptied_layers": emptied(masks), "input_connected": None if cut is None else not cut}


def compact_metrics(cfg: SweepConfig, seed: int, model) -> dict[str, Any]:
    """MACs and parameters of `model` compacted (`saliency.compact`), and its CPU latency as a
    ratio to the dense architecture's, both timed here, interleaved (`metrics.median_latency`).
    Transformer granularities: `compact_transformer_metrics`."""
    from saliency.sweep.metrics import count_flops, median_latency

    if structured(cfg):
        return compact_transformer_metrics(cfg, seed, model)
    ds, c = dataset(cfg), cfg.compact
    small = saliency.compact(model, example_inputs(cfg)).cpu()
    dense = new_model(cfg, seed)
    x = ds.test.tensors[0][: c["batch_size"]].cpu()
    times = median_latency({"dense": dense, "compact": small}, x, repeats=c["repeats"])
    return {
        "macs": count_flops(small, ds.input_shape)[0],
        "macs_dense": count_flops(dense, ds.input_shape)[0],
        "params": sum(p.numel() for p in small.parameters()),
        "params_dense": sum(p.numel() for p in dense.parameters()),
        "latency_ms": times["compact"],
        "latency_dense_ms": times["dense"],
        "latency_ratio": times["compact"] / times["dense"],
        "latency_batch": len(x),
        "latency_threads": torch.get_num_threads(),
    }


def prompt_tokens(cfg: SweepConfig, n: int) -> torch.Tensor:
    """``[1, n]``: the first `n` tokens of the test windows read as one text (then the
    calibration windows, if the test split is shorter): the prompt latency is measured on."""
    ds = dataset(cfg)
    ids = torch.cat([ds.test.tensors[0].flatten(), ds.train.tensors[0].flatten()])
    if len(ids) < n:
        raise ValueError(
            f"compact.prefill_tokens = {n}, but {cfg.dataset!r} holds {len(ids)} tokens"
        )
    return ids[:n][None].cpu()


def compact_transformer_metrics(cfg: SweepConfig, seed: int, model) -> dict[str, Any]:
    """The pruned causal LM `model` compacted (`saliency.compact_transformer`, its units found on
    `calibration_example`), against the dense architecture (`new_model`), both measured here on
    CPU, in this process, one sequence:

    - ``params`` / ``params_dense``: every parameter (tied ones once); ``params_blocks`` /
      ``params_blocks_dense``: those of the transformer blocks (embeddings, final norm and LM
      head excluded);
    - ``macs_per_token`` / ``macs_per_token_dense`` at ``macs_seq_len`` = ``prefill_tokens``
      (`metrics.transformer_macs`: Linear weights plus attention's score and value products);
    - for each thread count ``n`` of ``[compact] threads`` (`metrics.lm_latency`: greedy
      generation with the KV cache of ``decode_tokens`` tokens after a prompt of
      ``prefill_tokens`` tokens (`prompt_tokens`), the models in turn, medians of ``[compact]
      repeats`` rounds): ``latency_prefill_ms_tn`` / ``latency_prefill_dense_ms_tn`` (from the
      call to the first token) and their ratio ``latency_prefill_ratio_tn`` (below 1: the
      compacted model is faster); ``decode_tok_s_tn`` / ``decode_tok_s_dense_tn`` and
      ``decode_tok_s_ratio_tn`` (above 1: faster);
    - ``compact_loads_plain``: the compacted config states its widths (plain
      ``from_pretrained`` reloads it; else `saliency.load_compacted`)."""
    from saliency.compact_transformer import WIDTHS_KEY
    from saliency.model_io import is_causal_lm
    from saliency.sweep.metrics import block_parameters, lm_latency, transformer_macs

    c = cfg.compact
    example = calibration_example(cfg, seed)
    small = saliency.compact_transformer(model, example).cpu().eval()
    dense = new_model(cfg, seed).cpu().eval()
    models = {"compact": small, "dense": dense}
    if not all(is_causal_lm(m) for m in models.values()):
        raise ValueError(f"[compact] measure on {cfg.model!r}: decode speed needs a causal LM")
    example = example.cpu()
    found = {k: saliency.find_structure(m, example) for k, m in models.items()}
    ids = prompt_tokens(cfg, c["prefill_tokens"])
    speed = lm_latency(models, ids, decode_tokens=c["decode_tokens"], threads=c["threads"],
                       repeats=c["repeats"])  # fmt: skip
    out: dict[str, Any] = {}
    for k, m in models.items():
        tail = "" if k == "compact" else "_dense"
        out[f"params{tail}"] = sum(p.numel() for p in m.parameters())
        out[f"params_blocks{tail}"] = block_parameters(m, found[k])
        out[f"macs_per_token{tail}"] = transformer_macs(m, found[k], c["prefill_tokens"])
    for t in c["threads"]:
        pre = {k: speed[k][f"prefill_ms_t{t}"] for k in models}
        dec = {k: speed[k][f"decode_tok_s_t{t}"] for k in models}
        out.update({
            f"latency_prefill_ms_t{t}": pre["compact"],
            f"latency_prefill_dense_ms_t{t}": pre["dense"],
            f"latency_prefill_ratio_t{t}": pre["compact"] / pre["dense"],
            f"decode_tok_s_t{t}": dec["compact"],
            f"decode_tok_s_dense_t{t}": dec["dense"],
            f"decode_tok_s_ratio_t{t}": dec["compact"] / dec["dense"],
        })  # fmt: skip
    out.update(
        macs_seq_len=c["prefill_tokens"],
        prefill_tokens=c["prefill_tokens"],
        decode_tokens=c["decode_tokens"],
        latency_batch=1,
        latency_repeats=c["repeats"],
        compact_loads_plain=not getattr(small.config, WIDTHS_KEY, None),
    )
    return out
