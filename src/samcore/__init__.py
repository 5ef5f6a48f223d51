"""samcore: Segment Anything for microscopy, without any GUI dependency.

Layers: the torch model (`samcore.modeling`, built by `build_sam`), weights (`load_model`), and the
`Predictor` on top (one embedding, many prompts).
"""

from .build import ARCHITECTURES, build_sam
from .loading import list_models, load_model
from .predictor import ImageEmbedding, Predictor

__all__ = ["ARCHITECTURES", "ImageEmbedding", "Predictor", "build_sam", "list_models", "load_model"]
__version__ = "0.1.0"
