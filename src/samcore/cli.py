"""The `napari-sam` command line: list models and segment images without napari.

Coordinates on the command line follow napari and the files it writes: rows before columns,
i.e. `--point Y X` and `--box Y0 X0 Y1 X1`, with `--slice Z` picking a slice of a (Z, Y, X) stack.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

EXAMPLES = """examples:
  napari-sam demo --model vit_b_lm
  napari-sam models
  napari-sam segment cells.tif --box 40 60 120 150 -o cell.tif --model vit_b_lm
  napari-sam segment stack.tif --slice 12 --point 80 95 --negative 70 120 -o nucleus.tif
  napari-sam segment --sample nuclei --box 40 40 120 120 -o nucleus.tif --model vit_b
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of `napari-sam`; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, TypeError, LookupError, OSError, RuntimeError) as error:
        print(f"napari-sam: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("napari-sam: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-sam",
        description="Segment Anything for microscopy, from the command line.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    models = commands.add_parser("models", help="list the models and whether their weights are on this computer")
    models.set_defaults(run=_run_models)

    demo = commands.add_parser("demo", help="open napari on a sample stack with the SAM widget (needs napari)")
    demo.add_argument("--sample", default="synthetic_nuclei_3d", choices=["synthetic_nuclei_3d", "synthetic_nuclei_2d"])
    _model_options(demo, precision=False)
    demo.set_defaults(run=_run_demo)

    segment = commands.add_parser(
        "segment",
        help="segment one object of a 2D image (or one slice of a stack) from points and a box",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = segment.add_mutually_exclusive_group(required=True)
    source.add_argument("image", nargs="?", type=Path, help="a TIFF (or other image) file: YX, YXC or ZYX")
    source.add_argument("--sample", choices=["nuclei"], help="use a built-in synthetic sample instead of a file")
    segment.add_argument("--slice", type=int, help="Z index, for a (Z, Y, X) stack")
    segment.add_argument("--point", nargs=2, type=float, action="append", default=[], metavar=("Y", "X"),
                         help="a click on the object (repeatable)")
    segment.add_argument("--negative", nargs=2, type=float, action="append", default=[], metavar=("Y", "X"),
                         help="a click on background to exclude (repeatable)")
    segment.add_argument("--box", nargs=4, type=float, metavar=("Y0", "X0", "Y1", "X1"), help="a box around the object")
    segment.add_argument("-o", "--output", type=Path, required=True, help="labels TIFF to write (same YX shape)")
    _model_options(segment)
    segment.set_defaults(run=_run_segment)
    return parser


def _model_options(parser: argparse.ArgumentParser, precision: bool = True) -> None:
    parser.add_argument("--model", help="model name (see `napari-sam models`); default: the bundled model")
    parser.add_argument("--checkpoint", type=Path, help="a weight file of your own")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    if precision:
        parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])


def _run_models(args: argparse.Namespace) -> int:
    from .loading import list_models

    print(f"{'name':<22} {'architecture':<12} {'on disk':<8} description")
    for status in list_models():
        entry = status.entry
        print(f"{entry.name:<22} {entry.architecture:<12} {'yes' if status.cached else 'no':<8} {entry.description}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    import importlib

    try:  # the plugin, by name: the engine itself never imports napari
        demo = importlib.import_module("napari_sam._demo")
    except ImportError as error:
        raise RuntimeError(f"The demo needs napari and a Qt binding: pip install 'napari-sam[all]' ({error}).") from error
    checkpoint = None if args.checkpoint is None else str(args.checkpoint)
    return demo.main(args.model, checkpoint, args.device, args.sample)


def _run_segment(args: argparse.Namespace) -> int:
    import tifffile

    from .loading import load_model
    from .predictor import Predictor

    image = _read_slice(args)
    if not (args.point or args.negative or args.box):
        raise ValueError("Give at least one prompt: --point Y X, --negative Y X or --box Y0 X0 Y1 X1.")
    coords = [(x, y) for y, x in args.point + args.negative]
    labels = [1] * len(args.point) + [0] * len(args.negative)
    box = None if args.box is None else np.array([args.box[1], args.box[0], args.box[3], args.box[2]])

    started = time.perf_counter()
    model = load_model(args.model, args.checkpoint, args.device)
    predictor = Predictor(model, precision=args.precision)
    print(f"model {model.architecture or 'custom'} on {predictor.device} ({predictor.precision})", file=sys.stderr)
    predictor.set_image(image)
    embedded = time.perf_counter()
    masks, scores, _ = predictor.predict(
        point_coords=np.array(coords) if coords else None,
        point_labels=np.array(labels) if coords else None,
        box=box,
        multimask_output=len(coords) == 1 and box is None,
    )
    best = int(np.argmax(scores))
    mask = masks[best]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(args.output, mask.astype(np.uint16), compression="zlib")
    print(
        f"wrote {args.output}: {int(mask.sum())} pixels, predicted IoU {scores[best]:.3f} "
        f"(embedding {embedded - started:.1f} s incl. model load)",
        file=sys.stderr,
    )
    return 0


def _read_slice(args: argparse.Namespace) -> np.ndarray:
    if args.sample:
        from .synthetic import nuclei_image

        return nuclei_image(seed=0)[0]
    if not args.image.is_file():
        raise FileNotFoundError(f"No image file at {args.image}.")
    import tifffile

    image = tifffile.imread(args.image) if args.image.suffix.lower() in (".tif", ".tiff") else _read_other(args.image)
    if args.slice is not None:
        if image.ndim != 3:
            raise ValueError(f"--slice needs a (Z, Y, X) stack, but {args.image} has shape {image.shape}.")
        if not 0 <= args.slice < image.shape[0]:
            raise ValueError(f"--slice {args.slice} is outside the stack's {image.shape[0]} slices (0 to {image.shape[0] - 1}).")
        return image[args.slice]
    return image


def _read_other(path: Path) -> np.ndarray:
    from skimage import io

    return io.imread(path)


if __name__ == "__main__":
    raise SystemExit(main())
