"""The `napari-sam` command line: list models, precompute embeddings and segment images without napari.

Coordinates on the command line follow napari and the files it writes: rows before columns,
i.e. `--point Y X` and `--box Y0 X0 Y1 X1`, with `--slice Z` picking a slice of a (Z, Y, X) stack.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .precision import PRECISIONS
from .zoo import VIEWS

EXAMPLES = """examples:
  napari-sam demo --model vit_b_lm
  napari-sam models
  napari-sam segment cells.tif --box 40 60 120 150 -o cell.tif --model vit_b_lm
  napari-sam segment stack.tif --slice 12 --point 80 95 --negative 70 120 -o nucleus.tif
  napari-sam segment --sample nuclei --box 76 126 115 161 -o nucleus.tif --model vit_b
  napari-sam segment stack.tif --prompts nuclei.json --propagate -o labels.tif
  napari-sam embed stack.tif --cache-dir embeddings/
  napari-sam auto stack.tif -o stack_labels.tif --cache-dir embeddings/
"""

BATCH_EXAMPLES = """examples:
  napari-sam embed stack.tif --cache-dir emb/         # the widget finds them with the same cache folder
  napari-sam embed stacks/ --cache-dir emb/           # every .tif/.tiff of a folder
  napari-sam auto cells.tif -o cells_labels.tif
  napari-sam auto stacks/ -o labels/ --cache-dir emb/ # resumes where an interrupted run stopped
  napari-sam auto stack.tif --store stack.zarr --points-per-side 16 --min-area 50
  napari-sam auto stacks/ -o labels/ --cache-dir /shared/emb --scheduler tcp://10.0.0.5:8786
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
        help="segment an object of an image or slice from points and a box, or many from a prompts file",
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
    segment.add_argument("--prompts", type=Path, metavar="PROMPTS.json",
                         help='objects to segment, as JSON: {"objects": [{"id": 1, "points": [[z, y, x]], '
                              '"negative": [[z, y, x]], "boxes": [[[z, y0, x0], [z, y1, x1]]]}]}; '
                              "writes labels of the image's shape")
    segment.add_argument("--propagate", action="store_true",
                         help="with --prompts: extend each object up and down the stack from its prompted slices")
    segment.add_argument("--mode", help="with --propagate: how each slice is prompted: box+mask, box or points")
    segment.add_argument("--z-range", nargs=2, type=int, metavar=("FIRST", "LAST"),
                         help="with --propagate: the slices it may fill (inclusive)")
    segment.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                         help="with --point/--box: decode again with the first mask as input "
                              "(default: the model's choice, on for the bundled model; --prompts: once)")
    segment.add_argument("-o", "--output", type=Path, required=True,
                         help="labels TIFF to write (the image's shape; the slice's with --slice)")
    _model_options(segment)
    segment.set_defaults(run=_run_segment)

    embed = _batch_parser(commands, "embed", "precompute the embeddings of TIFF stacks into zarr stores")
    embed.set_defaults(run=_run_embed)

    auto = _batch_parser(commands, "auto", "segment every object of TIFF images or stacks, without prompts")
    option = auto.add_argument
    option("-o", "--output", type=Path,
           help="labels TIFF for one input, or a folder; default: NAME_labels.tif beside each input")
    option("--overwrite", action="store_true", help="redo inputs whose labels file exists")
    option("--points-per-side", type=int, help="point grid along each side (default 32)")
    option("--points-per-batch", type=int, help="points decoded at once (default 64)")
    option("--min-iou", type=float, dest="min_predicted_iou", help="least predicted IoU (default 0.88, the model's own where it has one)")
    option("--min-stability", type=float, help="least stability score (default 0.95, the model's own where it has one)")
    option("--min-area", type=int, help="smaller holes and islands are removed (default 25 pixels)")
    option("--crop-layers", type=int, help="extra layers of 2x2, 4x4... crops for small objects (default 0)")
    option("--link-overlap", type=float, default=0.5,
           help="3D: least overlap, as a fraction of the smaller object, to link objects of adjacent slices "
                "(default 0.5)")
    auto.set_defaults(run=_run_auto)
    return parser


def _batch_parser(commands, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand on one TIFF file or a folder of them, with store, cluster and model options."""
    parser = commands.add_parser(
        name, help=summary, description=summary + ".", epilog=BATCH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, help="a TIFF file (YX, YXC, ZYX) or a folder of them")
    parser.add_argument("--cache-dir", type=Path,
                        help="folder of embedding stores, one per input, named as the widget names them")
    parser.add_argument("--store", type=Path, help="the zarr folder of one input's embeddings")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="Dask scheduler to spread slices over its workers (stores on a shared disk)")
    _model_options(parser)
    return parser


def _model_options(parser: argparse.ArgumentParser, precision: bool = True) -> None:
    parser.add_argument("--model", help="model name (see `napari-sam models`); default: the bundled model")
    parser.add_argument("--checkpoint", type=Path, help="a weight file of your own")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    if precision:
        parser.add_argument(
            "--precision", default="auto", choices=PRECISIONS,
            help="encoder precision; auto: bf16 where this machine runs it faster than fp32, else fp32; int8: "
            "ViT models on CPUs where auto gives fp32 (compiles on first use)",
        )
        parser.add_argument(
            "--views", type=int, choices=VIEWS,
            help="average the masks of the image and its 1 or 3 mirror images (each costs one more embedding "
            "and decoding); default: the model's (2 for the bundled model, 1 for SAM's)",
        )


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

    if args.prompts is not None:
        if args.refine is not None:
            raise ValueError("--refine works on --point and --box; --prompts decodes each slice once.")
        return _run_prompts(args)
    if args.propagate or args.mode or args.z_range:
        raise ValueError("--propagate, --mode and --z-range work on the objects of a --prompts file.")
    image = _read_slice(args)
    if not (args.point or args.negative or args.box):
        raise ValueError("Give at least one prompt: --point Y X, --negative Y X or --box Y0 X0 Y1 X1.")
    coords = [(x, y) for y, x in args.point + args.negative]
    labels = [1] * len(args.point) + [0] * len(args.negative)
    box = None if args.box is None else np.array([args.box[1], args.box[0], args.box[3], args.box[2]])

    started = time.perf_counter()
    model = load_model(args.model, args.checkpoint, args.device)
    predictor = Predictor(model, precision=args.precision, refine=args.refine, views=args.views)
    passes = "refined" if predictor.refine else "one pass"
    print(f"model {model.architecture or 'custom'} on {predictor.device} "
          f"({predictor.precision}, {passes}, {_views_text(predictor.views)})", file=sys.stderr)
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


def _run_prompts(args: argparse.Namespace) -> int:
    import tifffile

    from .embeddings import StackView
    from .key_slices import segment_key_slices
    from .loading import load_model
    from .predictor import Predictor
    from .progress import run
    from .prompts_file import read_prompts
    from .propagation import PropagationSettings, check_z_range, propagate_iter
    from .slice_decoder import StackDecoder

    if args.slice is not None or args.point or args.negative or args.box:
        raise ValueError("--prompts replaces --slice, --point, --negative and --box: put every prompt in the file.")
    image = _read_slice(args)
    rgb = image.ndim == 4 or (image.ndim == 3 and image.shape[-1] in (3, 4))
    view = StackView.of(image, rgb=rgb)
    objects = read_prompts(args.prompts, image.shape[:-1] if rgb else image.shape)
    z_range = None if args.z_range is None else check_z_range(args.z_range, view.n_slices)
    settings = PropagationSettings(**({"mode": args.mode} if args.mode else {}), z_range=z_range)
    model = load_model(args.model, args.checkpoint, args.device)
    predictor = Predictor(model, precision=args.precision, views=args.views)
    decoder = StackDecoder(predictor, view)
    labels = segment_key_slices(decoder, objects)
    found = [o.object_id for o in objects if (labels == o.object_id).any()]
    for object_id in sorted({o.object_id for o in objects} - set(found)):
        print(f"napari-sam: object {object_id}: its prompts gave an empty mask; it is left out.", file=sys.stderr)
    if args.propagate and found:
        labels = run(propagate_iter(decoder, labels, found, settings)).labels
    labels = labels.reshape(image.shape[:-1] if rgb else image.shape)  # a 2D image stays 2D
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(args.output, labels, compression="zlib")
    for object_id in found:
        slices = np.flatnonzero((labels.reshape(view.data.shape[:3]) == object_id).any(axis=(1, 2)))
        print(f"object {object_id}: slices {slices[0]} to {slices[-1]}", file=sys.stderr)
    print(f"wrote {args.output}: {len(found)} objects, shape {labels.shape}", file=sys.stderr)
    return 0


def _run_embed(args: argparse.Namespace) -> int:
    from . import batch

    if args.cache_dir is None and args.store is None:
        raise ValueError("Say where embeddings go: --cache-dir DIR or --store FOLDER.zarr.")
    files, predictor, model_id, client = _batch_setup(args)
    try:
        for path in files:
            job = batch.embed_file(path, predictor, model_id, args.cache_dir, args.store, client)
            folder, computed = batch.with_progress_bar(job, path.name)
            print(f"{folder}: {computed} slices computed", file=sys.stderr)
    finally:
        if client is not None:
            client.close()
    return 0


def _run_auto(args: argparse.Namespace) -> int:
    from . import batch
    from .automatic import AutoSettings

    names = ("points_per_side", "points_per_batch", "min_predicted_iou", "min_stability", "min_area")
    given = {name: getattr(args, name) for name in (*names, "crop_layers") if getattr(args, name) is not None}
    AutoSettings(**given)  # bad values are refused before the model loads
    files, predictor, model_id, client = _batch_setup(args)
    settings = AutoSettings.for_model(predictor.model, **given)
    try:
        for path in files:
            output = batch.labels_path(path, args.output, len(files) > 1 or args.input.is_dir())
            if output.exists() and not args.overwrite:
                print(f"{output} exists: skipped (--overwrite to redo it)", file=sys.stderr)
                continue
            job = batch.auto_file(path, output, predictor, model_id, settings, args.link_overlap,
                                  args.cache_dir, args.store, client)
            count = batch.with_progress_bar(job, path.name)
            print(f"wrote {output}: {count} objects", file=sys.stderr)
    finally:
        if client is not None:
            client.close()
    return 0


def _batch_setup(args: argparse.Namespace) -> tuple[list[Path], object, str, object]:
    """The input files, a predictor, its model's key and a Dask client (None without --scheduler)."""
    from .batch import input_files
    from .embeddings import model_key
    from .loading import load_model
    from .predictor import Predictor

    files = input_files(args.input)
    if args.store is not None and args.cache_dir is not None:
        raise ValueError("Give --store (one input's store) or --cache-dir (a folder of stores), not both.")
    if args.store is not None and args.input.is_dir():
        raise ValueError("--store names the store of one input file; for a folder of inputs use --cache-dir.")
    model = load_model(args.model, args.checkpoint, args.device)
    predictor = Predictor(model, precision=args.precision, views=args.views)
    print(f"model {model.architecture or 'custom'} on {predictor.device} "
          f"({predictor.precision}, {_views_text(predictor.views)})", file=sys.stderr)
    client = None
    if args.scheduler:
        from .distributed import connect

        client = connect(args.scheduler)
    return files, predictor, model_key(model), client


def _views_text(views: int) -> str:
    return "1 view" if views == 1 else f"{views} mirrored views"


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
