"""saliency: second-order and saliency-based pruning for PyTorch.

score -> allocate -> (update) -> apply; `saliency.prune` does all four in one call.
"""

from saliency.allocate import allocate
from saliency.apply import attach, attached_masks, from_torch_prune, remove, to_torch_prune
from saliency.channels import ChannelGroups, ChannelPad, channel_groups
from saliency.checkpoint import load_checkpoint, save_checkpoint
from saliency.collapse import LayerCollapseWarning, ZeroScoreWarning
from saliency.compact import CompactError, compact
from saliency.compact_transformer import compact_transformer, load_compacted
from saliency.criteria import (
    Cost,
    Scores,
    available_criteria,
    describe_criteria,
    get_criterion,
    register_criterion,
)
from saliency.criteria.check import CriterionContractError, check_criterion
from saliency.hf import load_masks, load_pretrained, save_pretrained
from saliency.masks import Masks
from saliency.model_io import Batch, causal_lm_loss
from saliency.prune import GradualPruner, prune, score
from saliency.schedules import ConstantSparsity, Geometric, OneShot, PolynomialDecay
from saliency.structures import find_structure
from saliency.targets import prunable_parameters

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "ChannelGroups",
    "ChannelPad",
    "CompactError",
    "ConstantSparsity",
    "Cost",
    "CriterionContractError",
    "Geometric",
    "LayerCollapseWarning",
    "GradualPruner",
    "Masks",
    "OneShot",
    "PolynomialDecay",
    "Scores",
    "ZeroScoreWarning",
    "allocate",
    "attach",
    "attached_masks",
    "available_criteria",
    "causal_lm_loss",
    "channel_groups",
    "check_criterion",
    "compact",
    "compact_transformer",
    "describe_criteria",
    "find_structure",
    "from_torch_prune",
    "get_criterion",
    "load_checkpoint",
    "load_compacted",
    "load_masks",
    "load_pretrained",
    "prunable_parameters",
    "prune",
    "register_criterion",
    "remove",
    "save_checkpoint",
    "save_pretrained",
    "score",
    "to_torch_prune",
]
