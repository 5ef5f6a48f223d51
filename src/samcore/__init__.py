"""samcore: Segment Anything for microscopy, without any GUI dependency.

Layers: the torch model (`samcore.modeling`, built by `build_sam`), the `Predictor` on top
(one embedding, many prompts), and weights loading (`load_model`).
"""

from .build import ARCHITECTURES, build_sam
from .predictor import ImageEmbedding, Predictor

__all__ = ["ARCHITECTURES", "ImageEmbedding", "Predictor", "build_sam"]
__version__ = "0.1.0"
