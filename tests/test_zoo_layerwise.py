"""The layer-wise solvers (OBC, SparseGPT, Wanda) on every architecture of the zoo: each runs and
matches an independent reference built from the inputs each pruned layer receives in the final
pruned model (eval mode: the solvers calibrate so), or refuses with a clear error."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from arch_zoo import ARCH_IDS, ARCHS  # noqa: E402

import saliency  # noqa: E402

REFUSAL = r"layer-wise pruning (handles the weights of|cannot handle)"
DAMP = 0.1


def _prune_or_refusal(arch, crit, **hp):
    model, x, y = arch.make()
    dense = copy.deepcopy(model)
    try:
        masks = saliency.prune(model, crit, 0.5, data=[(x, y)], scope="layer", keep=False, **hp)
    except ValueError as e:
        assert re.search(REFUSAL, str(e)), str(e)
        return None
    return model, dense, x, masks


def _inputs(model, x, names):
    """Rows ``X [n, d]`` of each named Linear / Conv2d weight's input, as the layer sees it
    (Linear: any leading dims; Conv2d: the unfolded patches, zero padding), in eval mode."""
    mods = {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in names}
    rows, hooks = {n: [] for n in names}, []
    for n, m in mods.items():

        def hook(m, args, n=n):
            a = args[0].detach().double()
            if isinstance(m, nn.Conv2d):
                pad = m.padding
                if pad == "same":  # stride 1: the extra row / column of an even kernel at the end
                    tot = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
                    a = F.pad(
                        a, (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2)
                    )
                    pad = 0
                a = F.unfold(a, m.kernel_size, m.dilation, pad, m.stride).transpose(1, 2)
            rows[n].append(a.reshape(-1, a.shape[-1]))

        hooks.append(m.register_forward_pre_hook(hook))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def _damped(X):
    H = 2 * X.T @ X / len(X)
    d = torch.diagonal(H)
    d[d == 0] = 1.0
    d += DAMP * float(d.mean())
    return H


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_obc_rows_are_the_damped_refit_on_their_own_mask(arch):
    """OBC is exact greedy OBS per row: its kept weights are ``w0_K + Hd_KK^-1 Hd_KP w0_P``, the
    minimizer of ``(w - w0)^T Hd (w - w0)`` with the pruned ones at zero."""
    got = _prune_or_refusal(arch, "obc", damp=DAMP)
    if got is None:
        return
    model, dense, x, masks = got
    X = _inputs(model, x, list(masks))
    after, before = dict(model.named_parameters()), dict(dense.named_parameters())
    for n, keep in masks.items():
        W0 = before[n].detach().double().reshape(len(keep), -1)
        K = keep.reshape(len(keep), -1).bool()
        Hd = _damped(X[n])
        want = torch.zeros_like(W0)
        for r in range(len(W0)):
            k = K[r]
            want[r, k] = W0[r, k] + torch.linalg.solve(Hd[k][:, k], Hd[k][:, ~k] @ W0[r, ~k])
        torch.testing.assert_close(after[n].detach().double().reshape_as(W0), want,
                                   rtol=1e-4, atol=1e-6)  # fmt: skip
        assert int((~keep).sum()) == round(0.5 * keep.numel())


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_wanda_prunes_the_lowest_weight_times_input_norm_of_each_row(arch):
    got = _prune_or_refusal(arch, "wanda")
    if got is None:
        return
    model, dense, x, masks = got
    X = _inputs(model, x, list(masks))
    before = dict(dense.named_parameters())
    for n, keep in masks.items():
        W0 = before[n].detach().double().reshape(len(keep), -1)
        K = keep.reshape(len(keep), -1).bool()
        score = W0.abs() * X[n].norm(dim=0)
        for r in range(len(W0)):
            if K[r].any() and (~K[r]).any():
                assert score[r][~K[r]].max() <= score[r][K[r]].min()
        zeros = (~K).sum(1)
        assert int(zeros.sum()) == round(0.5 * keep.numel()) and zeros.max() - zeros.min() <= 1
        after = dict(model.named_parameters())[n].detach().double().reshape_as(W0)
        torch.testing.assert_close(after, W0 * K)  # no update


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_sparsegpt_exact_counts_and_nothing_else_touched(arch):
    """SparseGPT's own weights are checked against a column-by-column reference in
    test_solvers.py; here: it runs or refuses on every architecture, exact counts per layer,
    pruned weights zero, everything it did not target unchanged."""
    got = _prune_or_refusal(arch, "sparsegpt", damp=DAMP)
    if got is None:
        return
    model, dense, x, masks = got
    before = dict(dense.named_parameters())
    for n, p in model.named_parameters():
        if n in masks:
            assert int((~masks[n]).sum()) == round(0.5 * p.numel())
            assert bool((p[~masks[n].bool()] == 0).all())
        else:
            torch.testing.assert_close(p, before[n], rtol=0, atol=0)
