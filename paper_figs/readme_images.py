"""Small copies of built figures for README files: 2/3 size, 192-colour palette.

python -m paper_figs.readme_images FIGS_DIR [--out paper_figs/img] [STEM ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT = ("accuracy_vs_compression", "layer_sparsity", "agreement", "loss_prediction", "cost")


def shrink(src: Path, dst: Path, scale: float = 2 / 3, colors: int = 192) -> Path:
    from PIL import Image  # Pillow ships with matplotlib

    im = Image.open(src).convert("RGB")
    size = (round(im.width * scale), round(im.height * scale))
    im.resize(size, Image.LANCZOS).quantize(colors=colors).save(dst, optimize=True)
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m paper_figs.readme_images")
    p.add_argument("figs", type=Path, help="directory written by python -m paper_figs")
    p.add_argument("stems", nargs="*", default=list(DEFAULT))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "img")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for stem in args.stems:
        print(shrink(args.figs / f"{stem}.png", args.out / f"{stem}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
