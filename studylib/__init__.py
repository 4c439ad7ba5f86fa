"""studylib: diminishing returns in self-supervised learning, a notebook-first study of a 4.8M-parameter ViT.

The model API is importable from the top, e.g. `from studylib import ViNy, build_encoder, load_encoder`.
Those names load lazily (PEP 562), so `import studylib` and the `study` command do not import torch until
a model is asked for.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_LAZY = {
    name: "studylib.core.model"
    for name in ("ViNy", "MaskedImageModel", "Classifier", "Segmenter", "build_encoder", "load_encoder")
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
