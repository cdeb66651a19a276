"""`python -m saliency ...` runs the `saliency` command."""

from saliency.cli import main

if __name__ == "__main__":  # spawned sweep workers import this module again: run nothing then
    raise SystemExit(main())
