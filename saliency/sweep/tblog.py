"""Optional TensorBoard logging of sweep units (like tfmot's `PruningSummaries`).

With `tensorboard = true` in a sweep config and the `tensorboard` package installed, every unit
logs its per-layer sparsity, its global sparsity and its metrics under
`results/<sweep>/tensorboard/<label>/<mode>-seed<seed>`, with the target sparsity (in per mille)
as the step, so a whole curve reads as one TensorBoard plot; gradual units also log their
sparsity at every pruning step of training (`<label>/gradual-s<target>-seed<seed>`). Without
the package it is a no-op that logs one warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

from saliency import distributed

log = logging.getLogger(__name__)


class TensorBoard:
    def __init__(self, root: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._cls, self.root, self.writers = SummaryWriter, root, {}

    @classmethod
    def maybe(cls, cfg, out: Path) -> TensorBoard | None:
        if not cfg.tensorboard or not distributed.is_writer():  # torchrun: rank 0 logs
            return None
        try:
            return cls(Path(out) / "tensorboard")
        except ImportError:
            log.warning(
                "tensorboard = true but the tensorboard package is not installed; "
                "install saliency[tensorboard] to log (continuing without)"
            )
            return None

    def unit(self, job, unit, records: list[dict]) -> None:
        label = job.criterion.label if job.criterion else "dense"
        key = f"{label}/{unit.mode}-seed{job.seed}"
        if key not in self.writers:
            self.writers[key] = self._cls(log_dir=str(self.root / key))
        w, step = self.writers[key], round(unit.sparsity * 1000)
        first = records[0]
        w.add_scalar("sparsity/global", first["sparsity"], step)
        for name, s in first["layer_sparsity"].items():
            w.add_scalar(f"sparsity/{name}", s, step)
        for r in records:
            w.add_scalar(f"{r['phase']}/{r['metric']}", r["value"], step)

    def during(self, job, unit, step: int, masks) -> None:
        """Per-layer and global sparsity at a training step (gradual mode)."""
        if masks is None:
            return
        label = job.criterion.label if job.criterion else "dense"
        key = f"{label}/{unit.mode}-s{unit.sparsity:g}-seed{job.seed}"
        if key not in self.writers:
            self.writers[key] = self._cls(log_dir=str(self.root / key))
        w = self.writers[key]
        w.add_scalar("sparsity/global", masks.sparsity, step)
        for name, s in masks.layer_sparsity().items():
            w.add_scalar(f"sparsity/{name}", s, step)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers = {}
