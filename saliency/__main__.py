"""`python -m saliency ...` runs the `saliency` command."""

from saliency.cli import main

raise SystemExit(main())
