"""Datasets (offline, or from a user's directory; never downloads) and models, by name.

Not imported by the core: `import saliency` never loads this package.
"""

from saliency.zoo import smollm2 as _smollm2  # noqa: F401,E402  (smollm2-135m, pydoc_smollm2)
from saliency.zoo import text as _text  # noqa: F401,E402  (registers pydoc_chars, char_gpt)
from saliency.zoo.datasets import (
    Dataset,
    available_datasets,
    get_dataset,
    read_idx,
    register_dataset,
)
from saliency.zoo.models import available_models, get_model, register_model

__all__ = [
    "Dataset",
    "available_datasets",
    "available_models",
    "get_dataset",
    "get_model",
    "read_idx",
    "register_dataset",
    "register_model",
]
