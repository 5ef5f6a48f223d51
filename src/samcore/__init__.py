"""samcore: Segment Anything for microscopy, without any GUI dependency.

Layers: the torch model (`samcore.modeling`, built by `build_sam`), weights (`load_model`), the
`Predictor` on top (one embedding, many prompts), and on top of that `propagate` (objects through a
stack, slice after slice) and `segment_everything` (automatic segmentation of an image or a stack,
painted into labels; `AutomaticMaskGenerator` gives segment-anything's mask records of an image).
"""

from .automatic import AutoSettings
from .build import ARCHITECTURES, build_sam
from .jobs import segment_everything
from .loading import list_models, load_model, sam_model_registry
from .mask_generator import AutomaticMaskGenerator
from .predictor import ImageEmbedding, Predictor
from .propagation import PropagationSettings, propagate, propagate_iter

__all__ = [
    "ARCHITECTURES", "AutoSettings", "AutomaticMaskGenerator", "ImageEmbedding", "Predictor",
    "PropagationSettings", "build_sam", "list_models", "load_model", "propagate", "propagate_iter",
    "sam_model_registry", "segment_everything",
]
__version__ = "0.1.0"
