"""The `napari-sam` command line: list models, precompute embeddings and segment images without napari.

Coordinates on the command line follow napari and the files it writes: rows before columns,
i.e. `--point Y X` and `--box Y0 X0 Y1 X1`, with `--slice Z` picking a slice of a (Z, Y, X) stack.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .cli_inputs import check_output, engine_prompts, read_image, read_slice
from .precision import PRECISIONS
from .zoo import VIEWS

if TYPE_CHECKING:
    from .predictor import Predictor
    from .progress import Job
    from .slice_decoder import SliceDecoder

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

def main(argv: list[str] | None = None) -> int:
    """Entry point of `napari-sam`; returns the process exit code."""
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        with warnings.catch_warnings():  # restores Python's own display when done
            warnings.showwarning = _print_warning
            code = args.run(args)
        sys.stdout.flush()  # a reader that has gone is found here, not in Python's flush at exit
        return code
    except BrokenPipeError:  # `napari-sam models | head -3`: the reader is gone, nothing to say
        _silence_stdout()
        return 128 + 13  # as a program ended by SIGPIPE
    except (ValueError, TypeError, LookupError, OSError, RuntimeError) as error:
        print(f"napari-sam: error: {describe_error(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("napari-sam: interrupted", file=sys.stderr)
        return 130


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    """A warning as one line for the user, instead of Python's file, line and source."""
    print(f"napari-sam: warning: {message}", file=sys.stderr)


def _silence_stdout() -> None:
    """Point stdout at the null device, so that Python's last flush at exit does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor (tests capture it)
        pass


def counted(number: int, noun: str) -> str:
    """"1 object", "2 objects": a count with its noun, for what the commands print."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def describe_error(error: BaseException) -> str:
    """The error as a sentence; a system error names its path and the problem, not its errno."""
    if not isinstance(error, OSError) or error.filename is None or error.strerror is None:
        return str(error)
    path = error.filename
    if isinstance(error, FileExistsError):
        text = f"{path} is a file, where napari-sam needs a folder"
    elif isinstance(error, NotADirectoryError):
        blocking = next((p for p in Path(path).parents if p.is_file()), None)
        where = "a file is in the way" if blocking is None else f"{blocking} is a file"
        text = f"Cannot use {path}: {where}, where napari-sam needs a folder"
    elif isinstance(error, IsADirectoryError):
        text = f"{path} is a folder, where napari-sam needs a file"
    elif isinstance(error, FileNotFoundError):
        text = f"{path} does not exist"
    elif isinstance(error, PermissionError):
        text = f"No permission to use {path}"
    else:
        text = f"Cannot use {path}: {error.strerror}"
    from .download import CACHE_ENV_VAR

    cache = os.environ.get(CACHE_ENV_VAR)
    if cache and str(path).startswith(cache):
        text += f" ({CACHE_ENV_VAR} is set to {cache}: it must name a folder for model weights)"
    return text + "."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-sam",
        description="Segment Anything for microscopy, from the command line.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    models = commands.add_parser(
        "models", help="list the models and whether their weights are on this computer"
    )
    models.set_defaults(run=_run_models)

    demo = commands.add_parser(
        "demo", help="open napari on a sample stack with the SAM widget (needs napari)"
    )
    demo.add_argument(
        "--sample", default="synthetic_nuclei_3d", choices=["synthetic_nuclei_3d", "synthetic_nuclei_2d"]
    )
    model_options(demo, precision=False)
    demo.set_defaults(run=_run_demo)

    segment = commands.add_parser(
        "segment",
        help="segment an object of an image or slice from points and a box, or many from a prompts file",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = segment.add_mutually_exclusive_group(required=True)
    source.add_argument("image", nargs="?", type=Path, help="a TIFF (or other image) file: YX, YXC or ZYX")
    source.add_argument("--sample", choices=["nuclei"],
                        help="use a built-in synthetic sample instead of a file")
    segment.add_argument("--slice", type=int, help="Z index, for a (Z, Y, X) stack")
    segment.add_argument("--point", nargs=2, type=float, action="append", default=[], metavar=("Y", "X"),
                         help="a click on the object (repeatable)")
    segment.add_argument("--negative", nargs=2, type=float, action="append", default=[], metavar=("Y", "X"),
                         help="a click on background to exclude (repeatable)")
    segment.add_argument("--box", nargs=4, type=float, metavar=("Y0", "X0", "Y1", "X1"),
                         help="a box around the object: its top-left corner, then its bottom-right one")
    segment.add_argument("--prompts", type=Path, metavar="PROMPTS.json",
                         help='objects to segment, as JSON: {"objects": [{"id": 1, "points": [[z, y, x]], '
                              '"negative": [[z, y, x]], "boxes": [[[z, y0, x0], [z, y1, x1]]]}]}; '
                              "writes labels of the image's shape")
    segment.add_argument("--propagate", action="store_true",
                         help="with --prompts: extend each object up and down the stack from its "
                              "prompted slices")
    segment.add_argument("--mode",
                         help="with --propagate: how each slice is prompted: box+mask, box or points")
    segment.add_argument("--z-range", nargs=2, type=int, metavar=("FIRST", "LAST"),
                         help="with --propagate: the slices it may fill (inclusive)")
    segment.add_argument("--min-contrast", type=float, metavar="FRACTION",
                         help="with --propagate: end an object where it stands out from its surroundings "
                              "by less than this fraction of its contrast on its prompted slice "
                              "(default 0.5; 0: never)")
    segment.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                         help="with --point/--box: decode again with the first mask as input "
                              "(default: the model's choice, on for the bundled model; --prompts: once)")
    segment.add_argument("--zoom", action=argparse.BooleanOptionalAction, default=None,
                         help="decode a small box on the crop around it, enlarged, and clicks without a "
                              "box on an image over twice the model's input on a crop around them (default: "
                              "the model's choice, on for the bundled model)")
    segment.add_argument("-o", "--output", type=Path, required=True,
                         help="labels TIFF to write (the image's shape; the slice's with --slice)")
    segment.add_argument("--overwrite", action="store_true",
                         help="replace the output file if it exists (never one of the inputs)")
    model_options(segment)
    segment.set_defaults(run=_run_segment)

    from .cli_batch import add_batch_commands  # here: cli_batch imports this module's helpers

    add_batch_commands(commands)
    return parser


def model_options(parser: argparse.ArgumentParser, precision: bool = True) -> None:
    """Add --model, --checkpoint and --device to a subcommand (and --precision and --views)."""
    parser.add_argument("--model", help="model name (see `napari-sam models`); default: the bundled model")
    parser.add_argument("--checkpoint", type=Path, help="a weight file of your own")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    if precision:
        parser.add_argument(
            "--precision", default="auto", choices=PRECISIONS,
            help="encoder precision; auto: bf16 where this machine runs it faster than fp32, else fp32; "
            "int8: ViT models on CPUs with int8 dot products (VNNI) where auto gives fp32 "
            "(compiles on first use); bf16 or int8 on a CPU without their instructions "
            "runs fp32, with a warning",
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
        on_disk = "yes" if status.cached else "no"
        print(f"{entry.name:<22} {entry.architecture:<12} {on_disk:<8} {entry.description}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    import importlib

    try:  # the plugin, by name: the engine itself never imports napari
        demo = importlib.import_module("napari_sam._demo")
    except ImportError as error:
        raise RuntimeError(
            f"The demo needs napari and a Qt binding: pip install 'napari-sam[all]' ({error})."
        ) from error
    checkpoint = None if args.checkpoint is None else str(args.checkpoint)
    return demo.main(args.model, checkpoint, args.device, args.sample)


def _run_segment(args: argparse.Namespace) -> int:
    from .batch import write_tiff

    if args.prompts is not None:
        if args.refine is not None:
            raise ValueError("--refine works on --point and --box; --prompts decodes each slice once.")
        return _run_prompts(args)
    if args.propagate or args.mode or args.z_range or args.min_contrast is not None:
        raise ValueError(
            "--propagate, --mode, --z-range and --min-contrast work on the objects of a --prompts file."
        )
    if not (args.point or args.negative or args.box):
        raise ValueError("Give at least one prompt: --point Y X, --negative Y X or --box Y0 X0 Y1 X1.")
    if not (args.point or args.box):
        raise ValueError("--negative marks background only: add a point on the object (--point Y X) "
                         "or a box around it (--box Y0 X0 Y1 X1).")
    check_output(args)
    image = read_slice(args)
    coords, labels, box = engine_prompts(args, *image.shape[:2])

    started = time.perf_counter()
    predictor = load_predictor(
        args, refine=args.refine, show_refine=True, zoom=args.zoom,
        zooms_on="small boxes" if box is not None else "clicks on large images",
    )
    with _naming(args.image):
        predictor.set_image(image)
        embedded = time.perf_counter()
        one_click = coords is not None and len(coords) == 1 and box is None  # ambiguous: best of 3 masks
        masks, scores, _ = predictor.predict(
            point_coords=coords, point_labels=labels, box=box, multimask_output=one_click
        )
        zoomed = predictor.zoom and predictor.zoom_window(box, coords) is not None
    best = int(np.argmax(scores))
    mask = masks[best]
    write_tiff(args.output, mask.astype(np.uint16))
    how = ""
    if zoomed:
        how = "; decoded zoomed in on the box" if box is not None else "; decoded on a crop around the clicks"
    print(
        f"wrote {args.output}: {counted(int(mask.sum()), 'pixel')}, predicted IoU {scores[best]:.3f} "
        f"(embedding {embedded - started:.1f} s incl. model load{how})",
        file=sys.stderr,
    )
    return 0


def _run_prompts(args: argparse.Namespace) -> int:
    from .batch import CHANNELS_2D_READER, guess_rgb, refuse_channels, with_progress_bar, write_tiff
    from .embeddings import StackView
    from .key_slices import segment_key_slices_steps
    from .prompts_file import read_prompts
    from .propagation import PropagationSettings, check_z_range, propagate_iter
    from .slice_decoder import StackDecoder

    if args.slice is not None or args.point or args.negative or args.box:
        raise ValueError("--prompts replaces --slice, --point, --negative and --box: "
                         "put every prompt in the file.")
    if not args.propagate and (args.mode or args.z_range or args.min_contrast is not None):
        raise ValueError("--mode, --z-range and --min-contrast say how --propagate fills the stack: "
                         "add --propagate, or leave them out.")
    check_output(args)
    image = read_image(args)
    rgb = guess_rgb(image)
    with _naming(args.image):
        refuse_channels(image.shape, CHANNELS_2D_READER)
        view = StackView.of(image, rgb=rgb)
    objects = read_prompts(args.prompts, image.shape[:-1] if rgb else image.shape)
    z_range = None if args.z_range is None else check_z_range(args.z_range, view.n_slices)
    for entry in objects if z_range is not None else ():  # refused now, not after the model loads
        if not any(z_range[0] <= prompted.z <= z_range[1] for prompted in entry.slices):
            raise ValueError(f"Object {entry.object_id} is not on any slice between {z_range[0]} and "
                             f"{z_range[1]}: prompt it on a slice inside --z-range.")
    options = {"mode": args.mode, "min_contrast": args.min_contrast}
    try:
        settings = PropagationSettings(**{k: v for k, v in options.items() if v is not None}, z_range=z_range)
    except ValueError as error:  # named by the option that gave it
        raise ValueError(str(error).replace("min_contrast", "--min-contrast")) from None
    boxes = any(prompted.box is not None for entry in objects for prompted in entry.slices)
    clicks = any(prompted.box is None for entry in objects for prompted in entry.slices)
    zooms_on = " and ".join(["small boxes"] * boxes + ["clicks on large images"] * clicks)
    predictor = load_predictor(args, zoom=args.zoom, zooms_on=zooms_on)
    decoder = StackDecoder(predictor, view, zoom=predictor.zoom)
    name = "sample" if args.image is None else args.image.name
    prompted = sorted({s.z for o in objects for s in o.slices})
    with _naming(args.image):
        with_progress_bar(_embed_slices(decoder, prompted), f"{name}: prompted slices")
        job = segment_key_slices_steps(decoder, objects)
        labels = with_progress_bar(job, f"{name}: prompts", unit="prompt")
    found = [o.object_id for o in objects if (labels == o.object_id).any()]
    for object_id in sorted({o.object_id for o in objects} - set(found)):
        print(f"napari-sam: object {object_id}: its prompts gave an empty mask; it is left out.",
              file=sys.stderr)
    if args.propagate and found:
        with _naming(args.image):
            # Whole slices only: zoomed slices made propagation worse on the real nuclei3d stack.
            whole = StackDecoder(predictor, view, decoder.store)
            job = propagate_iter(whole, labels, found, settings)
            result = with_progress_bar(job, f"{name}: propagation", unit="object-slice")
            labels, stops = result.labels, result.stops
    else:
        stops = ()
    labels = labels.reshape(image.shape[:-1] if rgb else image.shape)  # a 2D image stays 2D
    write_tiff(args.output, labels)
    for object_id in found:
        slices = np.flatnonzero((labels.reshape(view.data.shape[:3]) == object_id).any(axis=(1, 2)))
        ended = "".join(f"; ended {stop.describe()}" for stop in stops if stop.object_id == object_id)
        print(f"object {object_id}: slices {slices[0]} to {slices[-1]}{ended}", file=sys.stderr)
    print(f"wrote {args.output}: {counted(len(found), 'object')}, shape {labels.shape}", file=sys.stderr)
    return 0


@contextmanager
def _naming(image: Path | None) -> Iterator[None]:
    """Name the image file in the errors of the work on it (the engine's messages say "the image")."""
    try:
        yield
    except (ValueError, TypeError) as error:
        if image is None:
            raise
        raise ValueError(f"{image}: {error}") from error


def _embed_slices(decoder: SliceDecoder, slices: list[int]) -> Job[None]:
    """Embed the slices a `StackDecoder` misses, yielding progress after each."""
    from .progress import Progress

    for done, z in enumerate(slices, start=1):
        if not decoder.has_embedding(z):
            decoder.embed(z)
        yield Progress("embedding", done, len(slices), z)


def load_predictor(
    args: argparse.Namespace,
    refine: bool | None = None,
    show_refine: bool = False,
    zoom: bool | None = False,
    zooms_on: str | None = None,
) -> Predictor:
    """The model and predictor the options ask for, announced on stderr before any work.

    `zoom` None follows the model; the jobs on stacks and folders decode without it. `zooms_on`: the
    prompts that zoom would look closer at ("small boxes"), if any are decoded (zoom is announced only
    then).
    """
    from .loading import load_model
    from .predictor import Predictor

    model = load_model(args.model, args.checkpoint, args.device)
    predictor = Predictor(
        model, precision=args.precision, refine=refine, views=args.views, zoom=zoom,
        embed_batch=getattr(args, "embed_batch", None),
    )
    passes = ("refined, " if predictor.refine else "one pass, ") if show_refine else ""
    if predictor.zoom and zooms_on:
        passes += f"zoom on {zooms_on}, "
    print(f"model {model.architecture or 'custom'} on {predictor.device} "
          f"({predictor.precision}, {passes}{_views_text(predictor.views)})", file=sys.stderr)
    return predictor


def _views_text(views: int) -> str:
    return "1 view" if views == 1 else f"{views} mirrored views"


if __name__ == "__main__":
    raise SystemExit(main())
