"""python -m paper_figs RESULTS... --out DIR [--only NAME ...] [--sparsity S] [--band std|ci95]"""

from __future__ import annotations

import argparse
import logging
import sys


def parse(argv=None) -> argparse.Namespace:
    from saliency.plotting import FIGURES

    p = argparse.ArgumentParser(
        prog="python -m paper_figs",
        description="Build every paper figure (PDF + PNG 200 dpi) and table (LaTeX + Markdown) "
        "that the sweep records in RESULTS support; the rest are skipped with a reason.",
    )
    p.add_argument("results", nargs="+", help="results directories (holding records.jsonl)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--only", nargs="+", choices=FIGURES, help="build only these")
    p.add_argument(
        "--sparsity",
        type=float,
        help="global sparsity for the per-layer and agreement figures "
        "(default: the recorded target closest to 0.9)",
    )
    p.add_argument(
        "--table-sparsities",
        type=float,
        nargs="+",
        metavar="S",
        help="columns of the table (default: every recorded target, at most six)",
    )
    p.add_argument(
        "--band",
        choices=("std", "ci95"),
        default="std",
        help="band around the mean over seeds: sample std or Student-t 95%% CI",
    )
    p.add_argument(
        "--usetex", action="store_true", help="render text with LaTeX (needs a TeX install)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("saliency").setLevel(logging.WARNING if args.quiet else logging.INFO)
    from saliency.plotting import FigureError, build_all

    try:
        paths = build_all(
            args.results,
            args.out,
            sparsity=args.sparsity,
            band=args.band,
            usetex=args.usetex,
            only=args.only,
            table_sparsities=args.table_sparsities,
            on_error="raise",
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FigureError as e:
        print(*e.paths, sep="\n")
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an output directory that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0 if paths else 1


if __name__ == "__main__":
    sys.exit(main())
