"""The `saliency` command: run sweeps, the offline demo, list criteria, report and plot results.

saliency demo [--out DIR] [--workers N]
saliency run CONFIG [--workers N] [--set key=value ...] [--out DIR] [--executor submitit]
saliency criteria | models | datasets
saliency report RESULTS... [--metric accuracy]
saliency figs RESULTS... --out DIR [--x sparsity|compression|macs|latency|params|prefill]

Exit status: 0 done, 1 a failure (one line on stderr saying why; --debug shows the traceback),
2 a bad config or argument, 130 interrupted (Ctrl-C; what was recorded is kept).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from importlib import resources
from pathlib import Path

EXACT_LIMIT = 20_000  # prunable parameters above which an exact (dense) Hessian is refused


def _print(*args, **kw) -> None:
    print(*args, **kw, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saliency", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a sweep from a TOML config")
    run.add_argument("config", type=Path)
    run.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted, TOML value), e.g. train.epochs=1",
    )
    run.add_argument(
        "--out",
        type=Path,
        default=Path("results"),
        help="results root; records go to OUT/<sweep name>/ (default: results)",
    )
    run.add_argument("--executor", choices=("local", "submitit"), default="local")
    run.add_argument(
        "--cluster",
        default=None,
        help="submitit cluster (default: Slurm if available; 'local' to test)",
    )
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads of this process (default: torch's choice)",
    )
    run.add_argument(
        "--keep-going", action="store_true", help="log a failing job and continue with the others"
    )

    demo = sub.add_parser("demo", help="the offline demo: every criterion on LeNet-300-100/MNIST")
    demo.add_argument("--out", type=Path, default=Path("results"))
    demo.add_argument(
        "--workers",
        type=int,
        default=2,
        help="worker processes (default 2: one per core of a small machine)",
    )
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: small models on shared cores run faster)",
    )
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    sub.add_parser("criteria", help="list the registered criteria")
    sub.add_parser("models", help="list the models a config can name, with their model_kwargs")
    sub.add_parser("datasets", help="list the datasets a config can name")

    rep = sub.add_parser("report", help="mean ± std per criterion and sparsity, as Markdown")
    rep.add_argument("results", nargs="+", type=Path, help="results directories or .jsonl files")
    rep.add_argument("--metric", default=None, help="only this metric (accuracy, loss, mse)")

    figs = sub.add_parser("figs", help="every figure the records support (PNG + PDF)")
    figs.add_argument("results", nargs="+", type=Path)
    figs.add_argument("--out", type=Path, required=True)
    figs.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="only this figure (repeatable), e.g. accuracy_vs_sparsity, table",
    )
    figs.add_argument(
        "--x",
        choices=("sparsity", "compression", "macs", "latency", "params", "prefill"),
        default=None,
        help="build the accuracy figure against this x-axis (with --only: in addition); macs, "
        "latency (channel sweeps) and prefill (transformer sweeps) are the compacted model's, "
        "relative to dense, params the fraction of the parameters it lost (sweeps run with "
        "[compact] measure = true)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("saliency.sweep.runner").setLevel(logging.INFO)  # resume notes
    # a config's `imports` finds modules in the current directory, as with `python -m saliency`
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from saliency.sweep.config import ConfigError
    from saliency.sweep.runner import SweepInterrupted

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)  # the application's choice, made once, at the top
    commands = {
        "run": cmd_run,
        "demo": cmd_demo,
        "criteria": cmd_criteria,
        "models": cmd_models,
        "datasets": cmd_datasets,
        "report": cmd_report,
        "figs": cmd_figs,
    }
    try:
        return commands[args.command](args)
    except SweepInterrupted as stop:
        r = stop.result
        done = r.skipped + r.ran
        _err(
            f"saliency {args.command}: interrupted; {done} of {r.units} unit(s) are recorded in "
            f"{r.records_path} and kept; run the same command again to do the other "
            f"{r.units - done}"
        )
        return 130
    except KeyboardInterrupt:
        _err(f"saliency {args.command}: interrupted")
        return 130
    except BrokenPipeError:  # `saliency criteria | head`: the reader left; not our failure
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a program killed by the broken pipe returns
    except (ConfigError, FileNotFoundError) as err:
        _err(f"saliency {args.command}: error: {err}", debug=args.debug)
        return 2
    except Exception as err:
        from saliency.plotting import FigureError
        from saliency.sweep.runner import SweepLocked

        plain = (OSError, SweepLocked, FigureError)
        what = str(err) if isinstance(err, plain) else f"{type(err).__name__}: {err}"
        _err(f"saliency {args.command}: error: {what}", debug=args.debug)
        return 1


def _err(line: str, *, debug: bool = False) -> None:
    if debug:
        import traceback

        traceback.print_exc()
    print(line, file=sys.stderr, flush=True)


def _finish_run(result, records) -> None:
    from saliency.sweep.report import summary_table

    _print()
    _print(summary_table(records))
    _print(
        f"{result.ran} unit(s) run, {result.skipped} already done, of {result.units}, "
        f"in {result.seconds:.1f} s"
    )
    for f in result.failures:
        _print(f"FAILED {f['kind']} job ({f['criterion']}, seed {f['seed']}): {f['error']}")
    _print(f"records: {result.records_path}")


def cmd_run(args) -> int:
    from saliency.sweep.config import load_config
    from saliency.sweep.records import read_records
    from saliency.sweep.runner import run_sweep

    cfg = load_config(args.config, args.overrides)
    result = run_sweep(
        cfg,
        args.out,
        workers=args.workers,
        executor=args.executor,
        cluster=args.cluster,
        progress=True,
        on_error="skip" if args.keep_going else "raise",
    )
    _finish_run(result, read_records(result.out))
    return 1 if result.failures else 0


def demo_raw(overrides=()) -> dict:
    from saliency.sweep.config import apply_overrides, tomllib

    text = resources.files("saliency.sweep").joinpath("demo.toml").read_text()
    return apply_overrides(tomllib.loads(text), overrides)


def probe_criteria(raw: dict) -> dict[str, str]:
    """{criterion: why it is skipped} for the registered criteria that cannot run in the demo:
    a missing optional dependency or another error on a tiny model, or an exact Hessian too big
    for the demo's model."""
    import dataclasses
    import importlib

    import torch

    import saliency
    from saliency.sweep.config import _fields
    from saliency.sweep.jobs import dataset, new_model

    for mod in raw.get("imports", []):  # plug-ins registering criteria, models, datasets
        importlib.import_module(mod)

    class _Cfg:  # just what dataset() / new_model() read
        dataset, data_root = raw["dataset"], raw.get("data_root")
        model, model_kwargs = raw["model"], raw.get("model_kwargs", {})

    ds = dataset(_Cfg)
    n_params = sum(p.numel() for p in saliency.prunable_parameters(new_model(_Cfg, 0)).values())
    x, y = ds.train.tensors[0][:16], ds.train.tensors[1][:16]
    tiny = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(x[0].numel(), 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, max(ds.num_classes or 1, 1)),
    )
    skipped = {}
    for name in saliency.available_criteria(raw.get("granularity") or "element"):
        given = raw.get("criterion_defaults", {}).get(name, {})
        hp = {k: v for k, v in given.items() if k in _fields(name)}
        try:
            crit = saliency.get_criterion(name, **hp)
            values = (
                [getattr(crit, f.name) for f in dataclasses.fields(crit)]
                if dataclasses.is_dataclass(crit)
                else []
            )
            if callable(getattr(crit, "solve_layer", None)) and raw.get("scope") != "layer":
                skipped[name] = "a layer-wise solver: it needs scope = 'layer'"
                continue
            if "exact" in values and n_params > EXACT_LIMIT:
                skipped[name] = (
                    f"exact Hessian of {n_params:,} parameters needs {n_params:,}^2 "
                    f"entries ({4 * n_params**2 / 2**30:,.0f} GiB)"
                )
                continue
            saliency.score(tiny, crit, [(x, y)])
        except ImportError as err:
            skipped[name] = f"needs an optional package that is not installed ({err})"
        except Exception as err:
            skipped[name] = f"failed on a tiny model: {type(err).__name__}: {err}"
    return skipped


def cmd_demo(args) -> int:
    from saliency.sweep.config import parse_config
    from saliency.sweep.records import read_records
    from saliency.sweep.runner import run_sweep

    start = time.perf_counter()
    raw = demo_raw(args.overrides)
    skipped = probe_criteria(raw) if raw.get("criteria") == "all" else {}
    left_out = sorted(set(raw.get("exclude_criteria", [])))
    raw["exclude_criteria"] = sorted(set(raw.get("exclude_criteria", [])) | set(skipped))
    cfg = parse_config(raw, name="demo")
    _print(
        f"saliency demo: {cfg.model} on {cfg.dataset}, {len(cfg.criteria)} criteria "
        f"({', '.join(c.label for c in cfg.criteria)}), sparsities "
        f"{', '.join(f'{s:g}' for s in cfg.sparsities)}, seeds {list(cfg.seeds)}, modes "
        f"{', '.join(cfg.modes)}"
    )
    for name, why in skipped.items():
        _print(f"  skipped {name}: {why}")
    if left_out:
        _print(
            f"  left out by the demo config: {', '.join(left_out)} (saliency/sweep/demo.toml says why)"
        )
    result = run_sweep(cfg, args.out, workers=args.workers, progress=True, on_error="skip")
    records = read_records(result.out)
    _finish_run(result, records)
    from saliency.plotting import accuracy_vs_sparsity

    figures = accuracy_vs_sparsity(records, result.out / "figures")
    for p in figures:
        if p.suffix in (".png", ".pdf"):
            _print(f"figure: {p}")
    _print(
        f"demo finished in {time.perf_counter() - start:.1f} s; "
        f"more figures: saliency figs {result.out} --out {result.out / 'figures'}"
    )
    # a criterion failing at run time is reported (above) and skipped, like those the probe
    # skipped; the demo fails only when no pruned result was produced at all
    return 0 if any(r["criterion"] != "dense" for r in records) else 1


def cmd_criteria(args) -> int:
    from saliency import describe_criteria

    desc = describe_criteria()
    w = max(map(len, desc), default=0)
    for name, line in desc.items():
        _print(f"{name:<{w}}  {line}")
    return 0


def _registry_lines(registry: dict, skip: tuple[str, ...]) -> list[str]:
    """`name  (keyword=default, ...)  first docstring line` per entry, aligned."""
    import inspect

    rows = []
    for name in sorted(registry):
        fn = registry[name]
        kw = [
            f"{p.name}={p.default!r}"
            for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in skip
        ]
        doc = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
        rows.append((name, ", ".join(kw), doc))
    w = max((len(r[0]) for r in rows), default=0)
    return [f"{n:<{w}}  {doc}" + (f" [{kw}]" if kw else "") for n, kw, doc in rows]


def cmd_models(args) -> int:
    from saliency.zoo import models

    for line in _registry_lines(models._MODELS, ()):
        _print(line)
    _print("(the [keywords] are what `model_kwargs` in a sweep config can set)")
    return 0


def cmd_datasets(args) -> int:
    from saliency.zoo import datasets

    for line in _registry_lines(datasets._DATASETS, ("data_root", "seed")):
        _print(line)
    return 0


def cmd_report(args) -> int:
    from saliency.sweep.records import read_records
    from saliency.sweep.report import markdown

    records = read_records(*args.results)
    if args.metric:
        records = [r for r in records if r.get("metric") == args.metric]
    _print(markdown(records), end="")
    return 0


def cmd_figs(args) -> int:
    from saliency.plotting import FigureError, build_all
    from saliency.plotting.curves import MEASURED, NEEDS

    only = args.only
    if args.x is not None:
        only = [*(only or []), f"accuracy_vs_{args.x}"]
    try:
        paths = build_all(args.results, args.out, only=only, on_error="raise")
    except FigureError as err:
        for p in err.paths:
            _print(p)
        raise
    except ValueError as err:  # an unknown --only name
        print(f"saliency figs: error: {err}", file=sys.stderr)
        return 2
    for p in paths:
        _print(p)
    _print(f"{len(paths)} file(s) written to {args.out}")
    if args.x in MEASURED and not any(f"_vs_{args.x}" in p.name for p in paths):
        print(
            f"saliency figs: error: no record carries the compacted model's {args.x}: "
            f"{NEEDS[args.x]}",
            file=sys.stderr,
        )
        return 2
    return 0
