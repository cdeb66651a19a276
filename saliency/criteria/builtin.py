"""Imports every module of `saliency.criteria` so that each built-in criterion registers itself.

A new built-in criterion is a new file in this folder; nothing else needs editing.
"""

import importlib
import pkgutil

import saliency.criteria as _pkg

for _info in pkgutil.iter_modules(_pkg.__path__):
    if _info.name not in {"base", "builtin"}:
        importlib.import_module(f"{_pkg.__name__}.{_info.name}")
