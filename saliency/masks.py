"""`Masks`: a validated mapping from parameter name to a bool tensor, True = keep."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from saliency.targets import parameter_aliases


class Masks(Mapping[str, Tensor]):
    """Keep-masks keyed by qualified parameter name (True = keep, False = pruned).

    `sparsity` is the fraction of zeros over all masked entries (the target set).
    """

    def __init__(self, masks: Mapping[str, Tensor]):
        checked: dict[str, Tensor] = {}
        for name, m in masks.items():
            if not isinstance(name, str):
                raise TypeError(f"mask keys must be parameter names (str); got {name!r}")
            if not isinstance(m, Tensor):
                raise TypeError(f"mask {name!r} must be a torch.Tensor; got {type(m).__name__}")
            if m.dtype != torch.bool:
                if m.is_floating_point() or m.dtype in (
                    torch.uint8,
                    torch.int8,
                    torch.int32,
                    torch.int64,
                ):
                    if not bool(((m == 0) | (m == 1)).all()):
                        raise ValueError(f"mask {name!r} must hold only 0/1 (or bool) values")
                    m = m != 0
                else:
                    raise TypeError(f"mask {name!r} must be bool or 0/1; got dtype {m.dtype}")
            checked[name] = m.detach()
        if not checked:
            raise ValueError("Masks needs at least one entry")
        self._masks = checked

    @classmethod
    def ones_like(cls, params: Mapping[str, Tensor]) -> Masks:
        """All-keep masks for `params` (sparsity 0)."""
        return cls(
            {n: torch.ones(p.shape, dtype=torch.bool, device=p.device) for n, p in params.items()}
        )

    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return f"Masks({len(self)} tensors, sparsity={self.sparsity:.4f})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Masks) or set(self) != set(other):
            return False
        return all(torch.equal(self[n].cpu(), other[n].cpu()) for n in self)

    __hash__ = None  # mutable contents, like dict

    @property
    def numel(self) -> int:
        return sum(m.numel() for m in self._masks.values())

    @property
    def zeros(self) -> int:
        return sum(int((~m).sum()) for m in self._masks.values())

    @property
    def sparsity(self) -> float:
        """Fraction of pruned entries over the whole target set."""
        return self.zeros / self.numel

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def emptied(self) -> list[str]:
        """Names of the tensors with every entry pruned (layer collapse)."""
        return [r["name"] for r in self.layer_report()[:-1] if r["emptied"]]

    def layer_sparsity(self) -> dict[str, float]:
        return {n: float((~m).sum()) / m.numel() for n, m in self._masks.items()}

    def layer_report(self) -> list[dict[str, Any]]:
        """One row per tensor (name, shape, numel, zeros, sparsity, emptied: every entry pruned,
        layer collapse), then a "total" row."""
        rows = [
            {
                "name": n,
                "shape": tuple(m.shape),
                "numel": m.numel(),
                "zeros": int((~m).sum()),
                "sparsity": float((~m).sum()) / m.numel(),
                "emptied": m.numel() > 0 and not bool(m.any()),
            }
            for n, m in self._masks.items()
        ]
        rows.append(
            {
                "name": "total",
                "shape": (),
                "numel": self.numel,
                "zeros": self.zeros,
                "sparsity": self.sparsity,
                "emptied": False,
            }
        )
        return rows

    def table(self) -> str:
        """The layer report as a fixed-width text table; emptied layers are marked EMPTIED."""
        rows = self.layer_report()
        w = max(len(r["name"]) for r in rows)
        lines = [f"{'name':<{w}}  {'shape':<18} {'numel':>10} {'zeros':>10} {'sparsity':>8}"]
        for r in rows:
            shape = "x".join(map(str, r["shape"])) or "-"
            lines.append(
                f"{r['name']:<{w}}  {shape:<18} {r['numel']:>10} {r['zeros']:>10} {r['sparsity']:>8.2%}"
                + ("  EMPTIED" if r["emptied"] else "")
            )
        return "\n".join(lines)

    def to(self, device: torch.device | str) -> Masks:
        return Masks({n: m.to(device) for n, m in self._masks.items()})

    def check_compatible(
        self,
        params: Mapping[str, Tensor],
        *,
        what: str = "model",
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        """Raise ValueError if names or shapes differ from `params`.

        `aliases` ({other qualified name: canonical name}, `targets.parameter_aliases`) lets the
        error say which canonical name a tied weight's other name stands for."""
        missing = [n for n in self if n not in params]
        tied = {n: aliases[n] for n in missing if aliases and n in aliases}
        if tied:
            raise ValueError(
                "masks are keyed by the names model.named_parameters() gives; these tensors are "
                "shared and named otherwise there: "
                + ", ".join(f"{n!r} is {c!r}" for n, c in tied.items())
            )
        if missing:
            raise ValueError(
                f"masks name parameters the {what} does not have: {missing[:5]}; "
                f"its parameters include: {list(params)[:8]}"
            )
        for n, m in self.items():
            if tuple(params[n].shape) != tuple(m.shape):
                raise ValueError(
                    f"mask {n!r} has shape {tuple(m.shape)} but the {what}'s parameter has shape "
                    f"{tuple(params[n].shape)}"
                )

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned weights of `model` in place (once; see `saliency.attach` to keep them 0)."""
        params = dict(model.named_parameters())
        self.check_compatible(params, aliases=parameter_aliases(model))
        for n, m in self.items():
            params[n].mul_(m.to(params[n].device, params[n].dtype))

    def state_dict(self) -> dict[str, Tensor]:
        return {n: m.cpu().clone() for n, m in self._masks.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> Masks:
        return cls(dict(state))

    def save(self, path: str | os.PathLike) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: nn.Module | None = None) -> Masks:
        """Load masks saved with `save`; with `model`, check names and shapes against it."""
        masks = cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if model is not None:
            masks.check_compatible(dict(model.named_parameters()), aliases=parameter_aliases(model))
        return masks
