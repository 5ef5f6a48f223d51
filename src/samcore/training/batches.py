"""Training batches: a few generated scenes and, for each, a handful of objects to prompt."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .scenes import Scene, make_scene

MIN_PROMPT_AREA = 64  # objects smaller than this (pixels) are not prompted unless nothing else exists
SIZE_WEIGHT = 0.5  # objects are prompted with probability proportional to area ** SIZE_WEIGHT
ZOOM_FLOOR = 0.15  # share of enlarged scenes after the size curriculum


@dataclass(frozen=True)
class Batch:
    """Images and the objects to segment in them.

    Attributes:
        images: (S, 3, H, W) float32 RGB, 0-255 (not yet normalised).
        masks: (N, H, W) bool ground truth of the N prompted objects.
        image_index: (N,) int64, the image each object lies in.
        families: The scene family of each image.
        regions: (S, 2, H, W) bool maps of every object of each image: foreground, and object
            pixels on an object's edge (next to background or to another object).
    """

    images: torch.Tensor
    masks: torch.Tensor
    image_index: torch.Tensor
    families: tuple[str, ...]
    regions: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        """The same batch on another device."""
        moved = (self.images.to(device), self.masks.to(device), self.image_index.to(device))
        return Batch(*moved, self.families, self.regions.to(device))


def make_batch(seed: int, step: int, scenes: int, objects: int, size: int, zoom_ramp: int = 0) -> Batch:
    """The batch of a training step; depends only on its arguments.

    Args:
        seed: Seed of the run.
        step: Training step; scenes step * scenes ... step * scenes + scenes - 1 are used.
        scenes: Images per batch.
        objects: Objects prompted per image (drawn with replacement when an image has fewer).
        size: Side of the scenes in pixels.
        zoom_ramp: Length in steps of the object-size curriculum (see `scene_zoom`); 0 for none.

    Returns:
        The batch, on the CPU.
    """
    if scenes < 1 or objects < 1:
        raise ValueError(f"A batch needs at least one scene and one object, not {scenes} and {objects}.")
    rng = np.random.default_rng([seed, step, 1])
    picked = []
    for j in range(scenes):
        zoom = scene_zoom(rng, step, zoom_ramp, size)
        scene = make_scene(seed, step * scenes + j, size=size, zoom=zoom)
        picked.append((scene, pick_objects(rng, scene.labels, objects)))
    return collate(picked)


def scene_zoom(rng: np.random.Generator, step: int, ramp: int, size: int) -> int:
    """Zoom of a training scene: the object-size curriculum.

    Models trained from scratch do not learn to find objects smaller than a token of the
    embedding grid (16 px) until they can find larger ones. Early scenes are therefore
    enlarged 2-4x; the share of enlarged scenes falls linearly to `ZOOM_FLOOR` at `ramp`
    steps and stays there.

    Args:
        rng: Random generator of the step.
        step: Training step.
        ramp: Steps until the curriculum ends (0: no enlarged scenes at all).
        size: Scene side; zooms leaving fewer than 64 px to render are skipped.

    Returns:
        1, 2, 3 or 4.
    """
    if ramp <= 0:
        return 1
    share = max(ZOOM_FLOOR, 1.0 - step / ramp)
    zooms = [z for z in (2, 3, 4) if size % z == 0 and size // z >= 64]
    if not zooms or rng.random() >= share:
        return 1
    return int(rng.choice(zooms))


def collate(picked: list[tuple[Scene, np.ndarray]]) -> Batch:
    """A batch from scenes and the label ids chosen in each."""
    images, masks, index = [], [], []
    for j, (scene, chosen) in enumerate(picked):
        images.append(torch.from_numpy(scene.image.astype(np.float32)).permute(2, 0, 1))
        labels = torch.from_numpy(scene.labels)
        masks.extend(labels == int(label) for label in chosen)
        index.extend([j] * len(chosen))
    families = tuple(scene.family for scene, _ in picked)
    regions = torch.stack([torch.from_numpy(region_maps(scene.labels)) for scene, _ in picked])
    return Batch(
        torch.stack(images), torch.stack(masks), torch.tensor(index, dtype=torch.int64), families, regions
    )


def region_maps(labels: np.ndarray) -> np.ndarray:
    """(2, H, W) bool foreground and edge maps of an (H, W) instance label image.

    An edge pixel belongs to an object and has a 4-neighbour with another label (background or
    a touching object), so the edge map separates touching objects where the foreground does not.
    """
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(labels.shape, dtype=bool)
    for neighbour in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        edge |= neighbour != centre
    foreground = labels > 0
    return np.stack([foreground, edge & foreground])


def pick_objects(rng: np.random.Generator, labels: np.ndarray, count: int) -> np.ndarray:
    """Label ids to prompt among objects of at least `MIN_PROMPT_AREA` pixels, larger ones more often.

    Crowded scenes hold many objects under one embedding token (16 px); drawn uniformly, they make
    most prompts, and a model from scratch learns to predict nothing before it learns to find
    anything. Drawing in proportion to the square root of the area keeps small objects in the mix
    (real nuclei of 15-25 px are common) while objects of several tokens, which it learns first,
    are seen more often.

    Args:
        rng: Random generator.
        labels: (H, W) int instance labels with at least one object.
        count: How many ids to return.

    Returns:
        (count,) int64 label ids, distinct when enough objects exist.
    """
    areas = np.bincount(labels.ravel())
    ids = np.flatnonzero(areas[1:] >= MIN_PROMPT_AREA) + 1
    if ids.size == 0:
        ids = np.flatnonzero(areas[1:]) + 1
    if ids.size == 0:
        raise ValueError("The scene holds no object to prompt.")
    weights = areas[ids].astype(np.float64) ** SIZE_WEIGHT
    return rng.choice(ids, size=count, replace=ids.size < count, p=weights / weights.sum()).astype(np.int64)


EVAL_SEED = 987_654_321  # a stream no training run uses (runs use small seeds)
EVAL_FAMILIES = ("nuclei", "nuclei", "irregular", "rods", "mixed", "epithelium", "em", "nuclei")


def make_eval_batches(
    size: int, objects: int = 8, per_batch: int = 2, scenes: int = len(EVAL_FAMILIES)
) -> list[Batch]:
    """A fixed validation set of synthetic scenes (cycling through `EVAL_FAMILIES`), in batches.

    Args:
        size: Side of the scenes in pixels.
        objects: Objects per scene.
        per_batch: Scenes per returned batch (bounds memory).
        scenes: Number of scenes; the first ones are the same whatever the number, so a larger set
            extends the one validated during training.

    Returns:
        Batches covering all validation scenes; identical in every run.
    """
    picked = []
    if scenes < 1:
        raise ValueError(f"The validation set needs at least one scene, not {scenes}.")
    for i in range(scenes):
        family = EVAL_FAMILIES[i % len(EVAL_FAMILIES)]
        scene = make_scene(EVAL_SEED, i, size=size, family=family)
        picked.append((scene, pick_objects(np.random.default_rng([EVAL_SEED, i]), scene.labels, objects)))
    return [collate(picked[start : start + per_batch]) for start in range(0, len(picked), per_batch)]
