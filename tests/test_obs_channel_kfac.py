"""obs_channel under K-FAC through the Kronecker eigenbases equals the explicit row blocks."""

import pytest
import torch

from saliency import kfac
from saliency.criteria.obs import _obs_z
from saliency.criteria.obs_channel import kfac_channel_costs


def _explicit(f, w):
    """The former path: row block ``H^-1[c, c]`` formed ``[in, in]`` per row, solved on Q."""
    W = f.as_matrix(w)
    live = f.live_mask() & (W != 0)
    z = _obs_z(f.row_inverse(slice(0, len(W))), W, live)
    return 0.5 * (W * z).sum(1)


def _factors(out, inn, samples, seed, damping=1e-3, live=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, inn, generator=g, dtype=torch.float64)
    Y = torch.randn(samples, out, generator=g, dtype=torch.float64)
    return kfac.KroneckerFactors(X.T @ X / samples, Y.T @ Y / samples, torch.Size([out, inn]),
                                 damping, live)  # fmt: skip


@pytest.mark.parametrize(
    "samples", [3, 40]
)  # low rank (as ResNet's layer4 from 16 samples) and full
def test_eigenbasis_costs_equal_explicit_row_blocks(samples):
    f = _factors(6, 10, samples, 0)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    w[1, :3] = 0  # a few pruned: Schur complement
    w[2, 2:] = 0  # most pruned: M_QQ directly
    w[3] = 0  # a pruned row costs nothing
    live = torch.ones(6, 10, dtype=torch.bool)
    live[4, 5] = False  # negligible curvature
    f.live = live
    got, want = kfac_channel_costs(f, w), _explicit(f, w)
    assert got[3] == 0
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


def test_transposed_and_conv_shapes():
    f = _factors(4, 3 * 2 * 2, 50, 2)
    f.shape = torch.Size([4, 3, 2, 2])
    w = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert torch.allclose(kfac_channel_costs(f, w), _explicit(f, w), rtol=1e-9)
