"""PIL-backed `resize` and `to_pil_image`, as torchvision applies them to PIL images."""

import numpy as np
from PIL import Image


def to_pil_image(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(image))


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    height, width = size
    return image.resize((width, height), Image.BILINEAR)
