"""Propagation through a confocal stack of nuclei: each prompting mode beside a naive baseline.

Data: `$NAPARI_SAM_DATA/nuclei3d` (default ../shared/data), a 60x256x256 stack with 20 labelled
nuclei. Its labels are weak (thresholded, with holes): read a 3D IoU of about 0.8 as good.

Protocol: every nucleus gets one box, its bounding box on its central slice, which the model
segments there (the same code path as `napari-sam segment --prompts`). From these masks all nuclei
are propagated together, once per mode, with the default stop rules. Printed:

  * per-object 3D IoU against the labels, mean and worst, for each mode and for the baseline of
    copying the central slice's mask over the nucleus's labelled z range;
  * time per object-slice of propagation with every embedding already computed (the goal is
    <= 20 ms on a laptop CPU), and the whole stack's embedding time;
  * the same table over `--generated N` (default 2) stacks of 40 touching nuclei each from
    `samcore.synthetic.nuclei_stack`, whose labels are exact: figures that involve no real data.

Nothing is tuned on the real data: the stop thresholds are `PropagationSettings`' defaults, and
`samcore.mask_prompts.DEFAULT_MODE` is the mode with the best mean IoU on the generated stacks
(the real stack then shows whether that choice holds there).

Run:
  python benchmarks/bench_propagation.py                          # the bundled model
  python benchmarks/bench_propagation.py --checkpoint weights.pth # any weight file
  # the mechanics alone, on random weights:
  python -c "import torch, samcore; torch.save(samcore.build_sam('micro_v1').state_dict(), 'random.pth')"
  python benchmarks/bench_propagation.py --checkpoint random.pth
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from samcore import Predictor, load_model
from samcore.embeddings import StackView
from samcore.key_slices import segment_key_slices
from samcore.mask_prompts import DEFAULT_MODE, MODES
from samcore.prompts_file import ObjectPrompts, PromptedSlice
from samcore.propagation import PropagationSettings, iou, propagate_iter
from samcore.slice_decoder import StackDecoder
from samcore.synthetic import nuclei_stack
from samcore.zoo import VIEWS

from machine import machine_line

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model name (default: the bundled model)")
    parser.add_argument("--checkpoint", type=Path, help="a weight file instead of a named model")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--generated", type=int, default=2, metavar="N",
                        help="also measure on N generated stacks of touching nuclei (0: none)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--views", type=int, choices=VIEWS,
                        help="views of each slice averaged (default: the model's)")
    parser.add_argument("--zoom-propagation", action="store_true",
                        help="decode the propagated slices' small boxes on the crop around them too "
                             "(the prompted central boxes follow the model's choice, as in the CLI)")
    parser.add_argument("--min-contrast", type=float, default=PropagationSettings.min_contrast,
                        help="the contrast stop rule's fraction (0: off; default %(default)s, the engine's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = open_model(args.model, args.checkpoint)
    image, truth = load_stack()
    predictor = Predictor(model, views=args.views)
    decoder = StackDecoder(predictor, StackView.of(image))
    print_machine(model, predictor, args.zoom_propagation, args.min_contrast)

    embedding_seconds = embed_all(decoder)
    print(f"\nnuclei3d {image.shape} {image.dtype}")
    print_rows(measure(decoder, truth, args.modes, args.zoom_propagation, args.min_contrast))
    print(f"\nwhole-stack embedding: {embedding_seconds:.1f} s for {image.shape[0]} slices "
          f"({embedding_seconds / image.shape[0] * 1000:.0f} ms per slice)")

    if args.generated:
        print(f"\n{args.generated} generated stacks {GENERATED_SHAPE} of touching nuclei "
              "(samcore.synthetic.nuclei_stack)")
        tables = []
        for seed in range(args.generated):
            stack, labels = nuclei_stack(GENERATED_SHAPE, n_nuclei=40, radius=(12.0, 24.0), seed=seed,
                                         z_radius=(8.0, 14.0), max_overlap=0.03)
            generated = StackDecoder(Predictor(model, views=args.views), StackView.of(stack))
            embed_all(generated)
            tables.append(measure(generated, labels, args.modes, args.zoom_propagation, args.min_contrast))
        rows = []
        for i, (name, _, per_slice) in enumerate(tables[0]):
            scores = np.concatenate([table[i][1] for table in tables])
            timing = None if per_slice is None else float(np.mean([table[i][2] for table in tables]))
            rows.append((name, scores, timing))
        print_rows(rows)
    print(f"\nDEFAULT_MODE is {DEFAULT_MODE!r}; per-object-slice times exclude embedding (all cached).")


GENERATED_SHAPE = (40, 256, 256)


def embed_all(decoder: StackDecoder) -> float:
    """Compute every slice's embedding, so that propagation is timed on cached ones; returns seconds."""
    started = time.perf_counter()
    for z in range(decoder.shape[0]):
        decoder.embed(z)
    return time.perf_counter() - started


Row = tuple[str, np.ndarray, float | None]  # method, per-object 3D IoUs, seconds per object-slice


def measure(
    decoder: StackDecoder, truth: np.ndarray, modes: list[str], zoom_propagation: bool, min_contrast: float
) -> list[Row]:
    """Per-object 3D IoUs of the copy baseline and of each mode, with seconds per object-slice.

    The central boxes are decoded as `napari-sam segment --prompts` does (zoomed in on small ones
    where the model says so); the propagation on whole slices unless `zoom_propagation`.
    """
    objects, extents = central_boxes(truth)
    predictor = decoder.predictor
    seeds = segment_key_slices(StackDecoder(predictor, decoder.view, decoder.store, zoom=predictor.zoom), objects)
    decoder = StackDecoder(predictor, decoder.view, decoder.store, zoom=zoom_propagation)
    seed_ious = [iou(seeds[o.slices[0].z] == o.object_id, truth[o.slices[0].z] == o.object_id) for o in objects]
    print(f"{len(objects)} nuclei; 2D IoU of the box-prompted central masks: mean {np.mean(seed_ious):.3f}, "
          f"worst {np.min(seed_ious):.3f}")
    found = [o.object_id for o in objects if (seeds == o.object_id).any()]
    outcomes = [("copy central mask", baseline(seeds, extents), None)]
    for mode in modes:
        settings = PropagationSettings(mode=mode, min_contrast=min_contrast)
        steps = propagate_iter(decoder, seeds, found, settings)
        started = time.perf_counter()
        decided = 0
        try:
            while True:
                step = next(steps)
                decided += len(step.written) + len(step.stops)
        except StopIteration as end:
            result = end.value
        per_slice = (time.perf_counter() - started) / max(decided, 1)
        outcomes.append((f"propagate, {mode}", result.labels, per_slice))
    return [
        (name, np.array([iou(labels == o.object_id, truth == o.object_id) for o in objects]), per_slice)
        for name, labels, per_slice in outcomes
    ]


def print_rows(rows: list[Row]) -> None:
    print(f"\n  {'method':<24}{'3D IoU mean':>12}{'worst':>8}{'ms / object-slice':>20}")
    for name, scores, per_slice in rows:
        timing = "" if per_slice is None else f"{per_slice * 1000:.1f}"
        print(f"  {name:<24}{np.mean(scores):>12.3f}{np.min(scores):>8.3f}{timing:>20}")


def load_stack() -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    data = Path(os.environ.get("NAPARI_SAM_DATA", ROOT.parent / "shared" / "data")) / "nuclei3d"
    if not data.is_dir():
        raise SystemExit(f"No benchmark data at {data}: set NAPARI_SAM_DATA to the folder holding nuclei3d/.")
    return tifffile.imread(data / "image.tif"), tifffile.imread(data / "labels.tif")


def open_model(name: str, checkpoint: Path | None) -> torch.nn.Module:
    try:
        return load_model(None if checkpoint is not None and name == "default" else name, checkpoint)
    except LookupError as error:
        raise SystemExit(f"{error}\nGive a weight file with --checkpoint.") from None


def central_boxes(truth: np.ndarray) -> tuple[list[ObjectPrompts], dict[int, tuple[int, int]]]:
    """One box prompt per object on its central slice, and each object's labelled z range."""
    objects, extents = [], {}
    for object_id in (int(i) for i in np.unique(truth) if i):
        present = np.flatnonzero((truth == object_id).any(axis=(1, 2)))
        first, last = int(present[0]), int(present[-1])
        z = int(present[np.argmin(np.abs(present - (first + last) / 2))])
        rows, cols = np.nonzero(truth[z] == object_id)
        box = np.array([rows.min(), cols.min(), rows.max(), cols.max()], dtype=float)
        objects.append(ObjectPrompts(object_id, (PromptedSlice(z, np.zeros((0, 2)), np.zeros((0, 2)), box),)))
        extents[object_id] = (first, last)
    return objects, extents


def baseline(seeds: np.ndarray, extents: dict[int, tuple[int, int]]) -> np.ndarray:
    """Each object's central mask copied to every slice of its labelled z range (background pixels only)."""
    labels = seeds.copy()
    for object_id, (first, last) in extents.items():
        where = np.flatnonzero((seeds == object_id).any(axis=(1, 2)))
        if len(where) == 0:
            continue
        mask = seeds[where[0]] == object_id
        for z in range(first, last + 1):
            labels[z][mask & (labels[z] == 0)] = object_id
    return labels


def print_machine(
    model: torch.nn.Module, predictor: Predictor, zoom_propagation: bool, min_contrast: float
) -> None:
    print(machine_line())
    name = getattr(model, "architecture", "") or "custom"
    zoom = ", central boxes: zoom on small ones" if predictor.zoom else ""
    zoom += ", propagation zoomed too" if zoom_propagation else ""
    print(f"model: {name} on {predictor.device} ({predictor.precision}, {predictor.views} view(s){zoom}); "
          f"contrast stop rule: {min_contrast:g}" + (" (off)" if min_contrast == 0 else ""))


if __name__ == "__main__":
    sys.exit(main())
