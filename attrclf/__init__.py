"""attrclf: multilabel image-attribute classification (1 / 0 / NA labels) on timm backbones."""

from .errors import AttrclfError
from .model import AttrClassifier, AttrConfig
from .predict import Predictor

__all__ = ["AttrClassifier", "AttrConfig", "AttrclfError", "Predictor"]
__version__ = "0.1.0"
