"""`napari-sam embed` and `napari-sam auto`: batch jobs on one TIFF file or a folder of them.

A file that fails is reported and the others go on; embeddings go to zarr stores that the widget
finds again, and a Dask scheduler may spread the slices over its workers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .cli import counted, describe_error, load_predictor, model_options
from .cli_inputs import check_labels_option

if TYPE_CHECKING:
    from .predictor import Predictor

BATCH_EXAMPLES = """examples:
  napari-sam embed stack.tif --cache-dir emb/         # the widget finds them with the same cache folder
  napari-sam embed stacks/ --cache-dir emb/           # every .tif/.tiff of a folder
  napari-sam auto cells.tif -o cells_labels.tif
  napari-sam auto stacks/ -o labels/ --cache-dir emb/ # run again: reuses the slices embedded and segmented
  napari-sam auto stack.tif --store stack.zarr --points-per-side 16 --min-area 50
  napari-sam auto stacks/ -o labels/ --cache-dir /shared/emb --scheduler tcp://10.0.0.5:8786
"""


# The options of `auto` that set an `AutoSettings` field, by field.
AUTO_FLAGS = {
    "points_per_side": "--points-per-side", "points_per_batch": "--points-per-batch",
    "min_predicted_iou": "--min-iou", "min_stability": "--min-stability", "min_area": "--min-area",
    "crop_layers": "--crop-layers",
}


def add_batch_commands(commands) -> None:
    """Add `embed` and `auto` to the subcommands of `napari-sam`."""
    embed = _batch_parser(commands, "embed", "precompute the embeddings of TIFF stacks into zarr stores")
    embed.set_defaults(run=run_embed)

    auto = _batch_parser(commands, "auto", "segment every object of TIFF images or stacks, without prompts")
    option = auto.add_argument
    option("-o", "--output", type=Path,
           help="labels TIFF for one input, or a folder; default: NAME_labels.tif beside each input")
    option("--overwrite", action="store_true", help="redo inputs whose labels file exists")
    option("--points-per-side", type=int, help="point grid along each side (default 32)")
    option("--points-per-batch", type=int, help="points decoded at once (default 64)")
    option("--min-iou", type=float, dest="min_predicted_iou",
           help="least predicted IoU (default 0.88, the model's own where it has one)")
    option("--min-stability", type=float,
           help="least stability score (default 0.95, the model's own where it has one)")
    option("--min-area", type=int, help="smaller holes and islands are removed (default 25 pixels)")
    option("--crop-layers", type=int, help="extra layers of 2x2, 4x4... crops for small objects (default 0)")
    option("--link-overlap", type=float, default=0.5,
           help="3D: least overlap, as a fraction of the smaller object, to link objects of adjacent slices "
                "(default 0.5)")
    auto.set_defaults(run=run_auto)


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
    model_options(parser)
    parser.add_argument("--embed-batch", type=_at_least_one, metavar="N",
                        help="slices given to the encoder per pass (default: 8 on a CUDA GPU, 1 elsewhere; "
                        "halved by itself where the GPU runs out of memory)")
    return parser


def _at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number is needed, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1 is needed, not {value}")
    return value


class _Setup(NamedTuple):
    """What every file of a batch is processed with."""

    predictor: Predictor
    model_id: str
    client: object  # a dask.distributed.Client, or None without --scheduler


def run_embed(args: argparse.Namespace) -> int:
    from . import batch

    if args.cache_dir is None and args.store is None:
        raise ValueError("Say where embeddings go: --cache-dir DIR or --store FOLDER.zarr.")
    files = _batch_inputs(args)
    readable, failed = _readable(files)

    def embed(path: Path, setup: _Setup) -> None:
        job = batch.embed_file(
            path, setup.predictor, setup.model_id, args.cache_dir, args.store, setup.client
        )
        folder, computed = batch.with_progress_bar(job, path.name)
        if computed == 0:
            print(f"{folder}: every slice was already there, none computed", file=sys.stderr)
        else:
            print(f"{folder}: {counted(computed, 'slice')} computed", file=sys.stderr)

    return _run_files(args, readable, failed, len(files), embed)


def run_auto(args: argparse.Namespace) -> int:
    from . import batch
    from .automatic import AutoSettings

    names = ("points_per_side", "points_per_batch", "min_predicted_iou", "min_stability", "min_area")
    given = {name: getattr(args, name) for name in (*names, "crop_layers") if getattr(args, name) is not None}
    for name, value in given.items():  # bad values are refused before the model loads, by their option
        try:
            AutoSettings(**{name: value})
        except ValueError as error:
            raise ValueError(str(error).replace(name, AUTO_FLAGS[name], 1)) from error
    if not 0 < args.link_overlap <= 1:
        raise ValueError(f"--link-overlap is a fraction of the smaller object, above 0 and at most 1, "
                         f"not {args.link_overlap:g}.")
    files = _batch_inputs(args)
    several = args.input.is_dir()
    check_labels_option(args, several)
    sources = [*files, *([args.checkpoint] if args.checkpoint else [])]
    outputs: dict[Path, Path] = {}
    failed: list[Path] = []
    for path in files:
        output = batch.labels_path(path, args.output, several)
        try:
            batch.refuse_input(output, sources, f"its labels file {output}")
            if output.is_dir():
                raise ValueError(f"its labels go to {output}, which is a folder.")
            taken = next((other for other, planned in outputs.items() if planned == output), None)
            if taken is not None:
                raise ValueError(f"its labels would go to {output}, as those of {taken.name}: "
                                 "rename one of them.")
        except ValueError as error:
            _file_error(path, error)
            failed.append(path)
            continue
        if output.exists() and not args.overwrite:
            print(f"{output} exists: skipped (--overwrite to redo it)", file=sys.stderr)
            continue
        outputs[path] = output
    readable, unreadable = _readable(list(outputs))

    def segment(path: Path, setup: _Setup) -> None:
        settings = AutoSettings.for_model(setup.predictor.model, **given)
        job = batch.auto_file(path, outputs[path], setup.predictor, setup.model_id, settings,
                              args.link_overlap, args.cache_dir, args.store, setup.client)
        count = batch.with_progress_bar(job, path.name)
        print(f"wrote {outputs[path]}: {counted(count, 'object')}", file=sys.stderr)
        if count == 0:
            print(f"  no mask was kept: none reached both a predicted IoU of {settings.min_predicted_iou:g} "
                  f"and a stability of {settings.min_stability:g}; lower --min-iou or --min-stability "
                  "to keep more", file=sys.stderr)

    return _run_files(args, readable, failed + unreadable, len(files), segment)


def _batch_inputs(args: argparse.Namespace) -> list[Path]:
    """The input files of `embed` and `auto`, once their store options are checked (before the model
    loads)."""
    from .batch import check_writable, input_files, refuse_input

    files, written = input_files(args.input)
    for path, image in written.items():
        print(f"skipped {path}: the labels napari-sam wrote for {image.name}", file=sys.stderr)
    if args.store is not None and args.cache_dir is not None:
        raise ValueError("Give --store (one input's store) or --cache-dir (a folder of stores), not both.")
    if args.store is not None and args.input.is_dir():
        raise ValueError("--store names the store of one input file; for a folder of inputs use --cache-dir.")
    if args.store is not None:
        refuse_input(args.store, files, f"--store {args.store}")
        check_writable(args.store, folder=True, what=f"--store {args.store}")
    if args.cache_dir is not None:
        check_writable(args.cache_dir, folder=True, what=f"--cache-dir {args.cache_dir}")
    return files


def _readable(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """The files napari-sam can read, by their TIFF headers, and the others (reported)."""
    from .batch import check_image_file

    readable, failed = [], []
    for path in files:
        try:
            check_image_file(path)
        except ValueError as error:
            _file_error(path, error)
            failed.append(path)
        else:
            readable.append(path)
    return readable, failed


def _run_files(
    args: argparse.Namespace, files: list[Path], failed: list[Path], total: int,
    work: Callable[[Path, _Setup], None],
) -> int:
    """Load the model (if there is work) and do `work` on each file; a failed file is reported and
    the others go on. Returns the exit code: 1 if any file failed, with a summary for a folder."""
    failed = list(failed)
    if files:
        setup = _batch_setup(args)
        try:
            for path in files:
                try:
                    work(path, setup)
                except (ValueError, TypeError, LookupError, OSError, RuntimeError) as error:
                    _file_error(path, error)
                    failed.append(path)
        finally:
            if setup.client is not None:
                setup.client.close()
    if failed and args.input.is_dir():
        names = ", ".join(sorted(path.name for path in failed))
        print(f"napari-sam: {len(failed)} of {total} files failed: {names}", file=sys.stderr)
    return 1 if failed else 0


def _file_error(path: Path, error: BaseException) -> None:
    print(f"napari-sam: error: {path}: {describe_error(error)}", file=sys.stderr)


def _batch_setup(args: argparse.Namespace) -> _Setup:
    """A predictor, its model's key and a Dask client (None without --scheduler)."""
    from .embeddings import model_key

    predictor = load_predictor(args)
    client = None
    if args.scheduler:
        from .distributed import connect

        client = connect(args.scheduler)
    return _Setup(predictor, model_key(predictor.model), client)
