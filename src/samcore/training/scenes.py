"""Procedural microscopy-like scenes with exact instance labels, for training SAM from scratch.

Families (`FAMILIES`):

* ``nuclei``: round to slightly irregular nuclei with chromatin texture, rims and nucleoli;
* ``irregular``: star-convex and lobed cells, sometimes with a dark hole where the nucleus is;
* ``rods``: bacteria-like capsules, straight or bent, sometimes aligned;
* ``mixed``: all of the above in one field;
* ``epithelium``: space-filling cells outlined by bright membranes;
* ``em``: space-filling cells with dark membranes and textured interiors (electron-microscopy-like).

Each scene draws object sizes (5 to 200 px across), density (sparse to crowded), overlap
rules, polarity (bright-on-dark or dark-on-bright), illumination, blur, noise and file dtype,
then passes the raw array through `samcore.preprocess.to_rgb_uint8` as inference does. A scene
depends only on (seed, index).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..preprocess import to_rgb_uint8
from . import optics
from .placement import Canvas, scatter
from .shapes import BlobSpec, RodSpec, Stamp, blob_stamp, random_harmonics, rod_stamp
from .tessellation import membrane_distance, tissue_region, voronoi_cells

FAMILIES = ("nuclei", "irregular", "rods", "mixed", "epithelium", "em")
FAMILY_WEIGHTS = (0.42, 0.12, 0.1, 0.12, 0.12, 0.12)
MAX_OBJECTS = 450  # per scene, which keeps generation fast
MIN_AREA = 6  # pixels; smaller visible remnants are not labelled


@dataclass(frozen=True)
class Scene:
    """A synthetic image and its instance labels.

    Attributes:
        image: (H, W, 3) uint8 RGB model input, as `to_rgb_uint8` makes it.
        labels: (H, W) int32 instance ids, 0 background and 1..n objects (every id present).
        raw: (H, W) uint8, uint16 or float32 array as a microscope would have saved it.
        family: Which of `FAMILIES` produced it.
    """

    image: np.ndarray
    labels: np.ndarray
    raw: np.ndarray
    family: str


@dataclass(frozen=True)
class Layers:
    """A family's output before imaging: ideal signal, labels, typical scale, polarity."""

    signal: np.ndarray
    labels: np.ndarray
    scale: float
    dark_on_bright: bool


def make_scene(seed: int, index: int, size: int = 512, family: str | None = None, zoom: int = 1) -> Scene:
    """Generate one scene.

    Args:
        seed: Seed of the whole data stream.
        index: Position of the scene in the stream.
        size: Side of the square scene in pixels (size / zoom at least 32).
        family: One of `FAMILIES`, or None to draw one.
        zoom: Render at size / zoom pixels and enlarge by this integer factor (bilinear image,
            nearest labels), as the predictor enlarges a small image: objects become `zoom`
            times larger and softer. Used for the object-size curriculum of training.

    Returns:
        The scene; it always holds at least one object. With zoom > 1, `raw` keeps the
        rendered (small) size.
    """
    if zoom < 1 or size % zoom or size // zoom < 32:
        raise ValueError(
            f"A {size} px scene cannot be zoomed by {zoom}: size / zoom must be a whole number >= 32."
        )
    if family is not None and family not in FAMILIES:
        raise ValueError(f"Unknown scene family {family!r}. Known families: {', '.join(FAMILIES)}.")
    rng = np.random.default_rng([seed, index])
    name = family or str(rng.choice(FAMILIES, p=FAMILY_WEIGHTS))
    side = size // zoom
    layers = _FAMILY_BUILDERS[name](rng, (side, side))
    labels = relabel_consecutive(layers.labels, MIN_AREA)
    if labels.max() == 0:  # everything was too small: fall back to one plain nucleus
        layers = _single_nucleus(rng, (side, side))
        labels = relabel_consecutive(layers.labels, 1)
    raw = optics.to_raw(rng, _image(rng, layers, labels))
    image = _tint(rng, to_rgb_uint8(raw))
    if zoom > 1:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
        labels = np.repeat(np.repeat(labels, zoom, axis=0), zoom, axis=1)
    return Scene(image, labels, raw, name)


def relabel_consecutive(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Drop labels smaller than `min_area` pixels and renumber the rest 1..n in order.

    Args:
        labels: (H, W) non-negative integer labels.
        min_area: Smallest area kept, in pixels.

    Returns:
        (H, W) int32 labels.
    """
    counts = np.bincount(labels.ravel())
    keep = counts >= min_area
    keep[0] = False
    mapping = np.zeros(counts.size, dtype=np.int32)
    mapping[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return mapping[labels]


# -- imaging ----------------------------------------------------------------------------------


def _image(rng: np.random.Generator, layers: Layers, labels: np.ndarray) -> np.ndarray:
    """Expected intensity (float32, objects near 1) from the ideal signal and the final labels."""
    shape = layers.signal.shape
    signal = layers.signal
    if rng.random() < 0.3:
        optics.add_specks(rng, signal)
    signal = optics.optical_blur(rng, signal, layers.scale)
    if rng.random() < 0.3:
        signal = signal + optics.out_of_focus_blobs(rng, shape, layers.scale)
    if layers.dark_on_bright:  # the typical object absorbs 25-65 % of the light
        inside = signal[::2, ::2][labels[::2, ::2] > 0]
        typical = float(np.median(inside)) if inside.size else float(signal.max(initial=0.0))
        contrast = rng.uniform(0.25, 0.65) / (typical + 1e-6)
        image = rng.uniform(0.6, 1.0) * np.clip(1.0 - contrast * signal, 0.02, None)
    else:
        image = signal + optics.background(rng, shape) * (1.0 + 3.0 * (rng.random() < 0.15))
    return (image * optics.illumination(rng, shape)).astype(np.float32)


def _tint(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Mostly grey; sometimes one or two colour channels, as fluorescence shown in colour."""
    if rng.random() > 0.08:
        return rgb
    weights = [(0, 1, 0), (1, 0, 1), (0, 1, 1), (1, 0, 0), (1, 1, 0)][int(rng.integers(0, 5))]
    return np.ascontiguousarray(rgb * np.asarray(weights, dtype=np.uint8))


# -- object families --------------------------------------------------------------------------


def _object_radius(rng: np.random.Generator, low: float, high: float) -> float:
    """Typical object radius of a scene: mostly nucleus-sized, sometimes anything in 2.5-100 px."""
    if rng.random() < 0.6:
        return float(np.exp(rng.uniform(np.log(low), np.log(high))))
    return float(np.exp(rng.uniform(np.log(2.5), np.log(100.0))))


def _objects(
    rng: np.random.Generator,
    shape: tuple[int, int],
    radius: float,
    draw: Callable[[np.random.Generator, float, float, float], tuple[Stamp, np.ndarray]],
    area_factor: float = 1.0,
) -> Canvas:
    """Scatter objects drawn by `draw(rng, cy, cx, radius)` until the scene's density is reached."""
    coverage = float(np.exp(rng.uniform(np.log(0.03), np.log(0.6))))
    count = int(np.clip(coverage * shape[0] * shape[1] / (np.pi * radius**2 * area_factor), 1, MAX_OBJECTS))
    overlap = [0.0, 0.12, 0.3][int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
    canvas = Canvas(shape, overlap)
    spacing = 2.0 * radius * np.sqrt(area_factor) * rng.uniform(0.95, 1.3)
    for cy, cx in scatter(rng, shape, count, spacing, MAX_OBJECTS):
        stamp, profile = draw(rng, cy, cx, radius)
        canvas.add(stamp, profile)
    return canvas


def _nucleus(rng: np.random.Generator, cy: float, cx: float, radius: float) -> tuple[Stamp, np.ndarray]:
    size = radius * float(np.exp(rng.normal(0.0, 0.2)))
    harmonics = random_harmonics(rng, rng.uniform(0, 0.12), 0.0)
    stamp = blob_stamp(BlobSpec(cy, cx, size, 1.0 + rng.exponential(0.25), rng.uniform(0, np.pi), harmonics))
    rim = rng.uniform(0, 0.6) * (rng.random() < 0.3)  # nuclear envelope stain
    return stamp, _profile(rng, stamp, size, dome=rng.uniform(0.0, 0.8), rim=rim)


def _irregular(rng: np.random.Generator, cy: float, cx: float, radius: float) -> tuple[Stamp, np.ndarray]:
    size = radius * float(np.exp(rng.normal(0.0, 0.25)))
    lobes = rng.uniform(0.15, 0.35) * (rng.random() < 0.5)
    harmonics = random_harmonics(rng, rng.uniform(0.1, 0.45), lobes)
    spec = BlobSpec(cy, cx, size, 1.0 + rng.exponential(0.4), rng.uniform(0, np.pi), harmonics)
    stamp = blob_stamp(spec)
    profile = _profile(rng, stamp, size, dome=rng.uniform(0.0, 0.4), rim=0.0)
    if rng.random() < 0.3:  # cytoplasm stain: the nucleus stays dark
        hole = np.exp(-((stamp.radial / rng.uniform(0.3, 0.5)) ** 2))
        profile = profile * (1.0 - rng.uniform(0.4, 0.9) * hole)
    return stamp, profile


def _rod(
    rng: np.random.Generator, cy: float, cx: float, radius: float, angle: float | None = None
) -> tuple[Stamp, np.ndarray]:
    width = 2.0 * radius * float(np.exp(rng.normal(0.0, 0.12)))
    length = width * rng.uniform(0.8, 5.0)
    heading = rng.uniform(0, np.pi) if angle is None else angle + rng.normal(0, 0.25)
    spec = RodSpec(cy, cx, length, width, heading, rng.uniform(-0.8, 0.8) / max(length + width, 1.0))
    stamp = rod_stamp(spec)
    return stamp, _profile(rng, stamp, width / 2, dome=rng.uniform(0.2, 1.0), rim=0.0)


def _profile(rng: np.random.Generator, stamp: Stamp, radius: float, dome: float, rim: float) -> np.ndarray:
    """Intensity over an object: brightness x (flat..domed), plus an optional bright rim.

    Returns:
        (h, w) float32 over the stamp's window.
    """
    brightness = float(np.exp(rng.normal(0.0, 0.35)))
    inside = np.clip(1.0 - stamp.radial**2, 0.0, 1.0)
    value = (1.0 - dome) + dome * np.sqrt(inside)
    if rim > 0:
        depth_px = (1.0 - np.minimum(stamp.radial, 1.0)) * radius
        value = value + rim * np.exp(-((depth_px / max(1.0, 0.12 * radius)) ** 2))
    return (brightness * value).astype(np.float32)


def _textured(rng: np.random.Generator, canvas: Canvas, radius: float) -> np.ndarray:
    """Chromatin-like grain, bright clumps and dark nucleoli multiplied into the signal.

    One band-limited noise field makes all three: its values scale the grain, its highest
    values become bright clumps and its lowest dark holes.
    """
    shape = canvas.signal.shape
    field = optics.band_noise(rng, shape, float(np.clip(radius * rng.uniform(0.08, 0.3), 0.6, 4.0)))
    factor = np.clip(1.0 + rng.uniform(0.0, 0.5) * field, 0.15, None)
    if rng.random() < 0.5:
        factor += rng.uniform(0.5, 2.0) * np.maximum(field - rng.uniform(1.2, 2.2), 0.0)
    if rng.random() < 0.3:
        factor *= 1.0 - rng.uniform(0.3, 0.7) * np.clip(-field - 1.8, 0.0, 1.0)
    return canvas.signal * factor


def _blob_family(
    draw: Callable[[np.random.Generator, float, float, float], tuple[Stamp, np.ndarray]],
    radii: tuple[float, float],
    area_factor: float,
    dark_chance: float,
) -> Callable[[np.random.Generator, tuple[int, int]], Layers]:
    def build(rng: np.random.Generator, shape: tuple[int, int]) -> Layers:
        radius = _object_radius(rng, *radii)
        canvas = _objects(rng, shape, radius, draw, area_factor)
        return Layers(_textured(rng, canvas, radius), canvas.labels, radius, bool(rng.random() < dark_chance))

    return build


def _rods(rng: np.random.Generator, shape: tuple[int, int]) -> Layers:
    half_width = float(np.exp(rng.uniform(np.log(1.5), np.log(8.0))))
    aligned = rng.uniform(0, np.pi) if rng.random() < 0.4 else None

    def draw(rng: np.random.Generator, cy: float, cx: float, radius: float) -> tuple[Stamp, np.ndarray]:
        return _rod(rng, cy, cx, radius, aligned)

    canvas = _objects(rng, shape, half_width, draw, area_factor=3.5)
    scale = half_width * 2
    return Layers(_textured(rng, canvas, scale), canvas.labels, scale, bool(rng.random() < 0.3))


def _mixed(rng: np.random.Generator, shape: tuple[int, int]) -> Layers:
    radius = _object_radius(rng, 4.0, 16.0)
    kinds = (_nucleus, _irregular, lambda r, y, x, s: _rod(r, y, x, s / 2))
    weights = rng.dirichlet(np.ones(3))

    def draw(rng: np.random.Generator, cy: float, cx: float, size: float) -> tuple[Stamp, np.ndarray]:
        return kinds[int(rng.choice(3, p=weights))](rng, cy, cx, size * float(np.exp(rng.normal(0, 0.35))))

    canvas = _objects(rng, shape, radius, draw)
    return Layers(_textured(rng, canvas, radius), canvas.labels, radius, bool(rng.random() < 0.25))


def _single_nucleus(rng: np.random.Generator, shape: tuple[int, int]) -> Layers:
    radius = min(shape) / 8
    canvas = Canvas(shape, 0.0)
    canvas.add(*_nucleus(rng, shape[0] / 2, shape[1] / 2, radius))
    return Layers(canvas.signal, canvas.labels, radius, False)


# -- tilings ------------------------------------------------------------------------------------


def _tiling(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Cells, distance to membranes, membrane half-thickness and cell diameter."""
    diameter = float(np.exp(rng.uniform(np.log(14.0), np.log(130.0))))
    cells = voronoi_cells(rng, shape, diameter, regularity=rng.uniform(0.0, 1.0))
    distance = membrane_distance(cells)
    thickness = float(np.clip(rng.uniform(0.6, 2.5) * (1 + diameter / 80), 0.6, 4.0))
    return cells, distance, thickness, diameter


def _epithelium(rng: np.random.Generator, shape: tuple[int, int]) -> Layers:
    cells, distance, thickness, diameter = _tiling(rng, shape)
    membrane = np.exp(-((distance / thickness) ** 2))
    interior = rng.uniform(0.0, 0.35) * np.exp(rng.normal(0, 0.3, cells.max() + 1))[cells]
    grain = optics.band_noise(rng, shape, rng.uniform(0.8, 3.0))
    signal = membrane * np.clip(1.0 + 0.3 * grain, 0.2, None)
    signal = signal + interior * np.clip(1.0 + 0.4 * grain, 0.0, None)
    labels = np.where(distance > thickness * 0.8, cells, 0)
    if rng.random() < 0.35:
        tissue = tissue_region(rng, shape)
        signal, labels = signal * tissue, np.where(tissue, labels, 0)
    return Layers(signal.astype(np.float32), labels, thickness * 2, bool(rng.random() < 0.2))


def _em(rng: np.random.Generator, shape: tuple[int, int]) -> Layers:
    """Absorbance-like signal (rendered dark-on-bright): dark walls, grainy cytoplasm, organelles."""
    cells, distance, thickness, diameter = _tiling(rng, shape)
    membrane = np.exp(-((distance / thickness) ** 2))
    shade = rng.uniform(0.05, 0.35) * np.exp(rng.normal(0, 0.35, cells.max() + 1))[cells]
    grain = optics.band_noise(rng, shape, rng.uniform(0.7, 2.0))
    blobs = optics.band_noise(rng, shape, float(np.clip(diameter * 0.06, 1.0, 5.0)))
    organelles = rng.uniform(0.2, 0.8) * np.clip(blobs - rng.uniform(1.3, 2.2), 0.0, 0.5) * 2.0
    signal = membrane + shade * np.clip(1.0 + 0.5 * grain, 0.0, None)
    signal = signal + organelles * (distance > thickness * 2)
    labels = np.where(distance > thickness * 0.8, cells, 0)
    return Layers(signal.astype(np.float32), labels, thickness * 2, bool(rng.random() < 0.85))


_FAMILY_BUILDERS: dict[str, Callable[[np.random.Generator, tuple[int, int]], Layers]] = {
    "nuclei": _blob_family(_nucleus, radii=(3.0, 14.0), area_factor=1.0, dark_chance=0.2),
    "irregular": _blob_family(_irregular, radii=(5.0, 30.0), area_factor=1.3, dark_chance=0.25),
    "rods": _rods,
    "mixed": _mixed,
    "epithelium": _epithelium,
    "em": _em,
}
