"""saliency: second-order and saliency-based pruning for PyTorch.

score -> allocate -> (update) -> apply; `saliency.prune` does all four in one call.
"""

from saliency.criteria import (
    Cost,
    Scores,
    available_criteria,
    describe_criteria,
    get_criterion,
    register_criterion,
)
from saliency.targets import prunable_parameters

__version__ = "0.1.0"

__all__ = [
    "Cost",
    "Scores",
    "available_criteria",
    "describe_criteria",
    "get_criterion",
    "prunable_parameters",
    "register_criterion",
]
