"""attrclf: multilabel image-attribute classification (1 / 0 / NA labels) on timm backbones.

The public names load on first use, so `import attrclf` stays light and `python -m attrclf.predict` runs cleanly.
"""

from .errors import AttrclfError

__all__ = ["AttrClassifier", "AttrConfig", "AttrclfError", "Predictor"]
__version__ = "0.1.0"

_LAZY = {"AttrClassifier": ".model", "AttrConfig": ".model", "Predictor": ".predict"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'attrclf' has no attribute '{name}'")
