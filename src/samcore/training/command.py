"""``python -m samcore.training``: train a run, extend it, or export and validate its last checkpoint."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..build import build_sam
from ..modeling import Sam
from .checkpoints import STATE_NAME, load_state
from .settings import TrainSettings
from .train import count_parameters, export_with_notes, format_metrics, train, validate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(
        prog="python -m samcore.training",
        description="Train a small SAM on procedurally generated microscopy scenes.",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for checkpoints, logs and weights")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--minutes", type=float, help="wall-clock budget of this session")
    parser.add_argument("--steps", type=int, default=0, help="schedule length (default: fitted to --minutes)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--extend", type=int, default=0,
                        help="with --resume: add this many steps, restarting the learning rate")
    parser.add_argument("--restart-lr", type=float, default=0.25,
                        help="peak of the restarted learning rate relative to --lr (with --extend)")
    parser.add_argument("--export-only", action="store_true",
                        help="export the weights of the run's last checkpoint and stop")
    parser.add_argument("--eval-only", action="store_true",
                        help="validate the run's last checkpoint on --eval-scenes scenes and stop")
    parser.add_argument("--eval-scenes", type=int, default=64,
                        help="scenes of the synthetic validation set for --eval-only (training uses 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--workers", type=int, default=0, help="processes generating scenes ahead (GPU runs)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--arch", default=defaults.arch)
    parser.add_argument("--init", default=defaults.init,
                        help="start from these weights: a model name (e.g. default) or a weight file")
    parser.add_argument("--size", type=int, default=defaults.size, help="scene side in pixels")
    parser.add_argument("--loss-size", type=int, default=defaults.loss_size, help="0: the scene size")
    parser.add_argument("--focal-ramp", type=int, default=defaults.focal_ramp, help="steps to reach 20:1")
    parser.add_argument("--zoom-ramp", type=int, default=defaults.zoom_ramp, help="size-curriculum steps")
    parser.add_argument("--scenes", type=int, default=defaults.scenes, help="scenes per step")
    parser.add_argument("--objects", type=int, default=defaults.objects, help="objects per scene")
    parser.add_argument("--max-corrective", type=int, default=defaults.max_corrective)
    parser.add_argument("--corrective-from", type=int, default=defaults.corrective_from)
    parser.add_argument("--geometry-steps", type=int, default=defaults.geometry_steps,
                        help="decoder warm-up steps on prompt geometry before the scenes")
    parser.add_argument("--dense-weight", type=float, default=defaults.dense_weight,
                        help="weight of the foreground/edge head's loss (0: no head)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--save-every", type=int, default=defaults.save_every)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m samcore.training``; returns the exit code."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.export_only:
            path = export_run(args.out)
            print(f"Exported {path} from {args.out / STATE_NAME}.")
            check_export(path, print)
            return 0
        if args.eval_only:
            metrics = evaluate_run(args.out, args.eval_scenes)
            print(f"{args.out / STATE_NAME}, {args.eval_scenes} validation scenes: {format_metrics(metrics)}")
            return 0
        settings = TrainSettings(
            arch=args.arch, seed=args.seed, total_steps=args.steps, size=args.size, loss_size=args.loss_size,
            focal_ramp=args.focal_ramp, zoom_ramp=args.zoom_ramp, scenes=args.scenes, objects=args.objects,
            max_corrective=args.max_corrective, corrective_from=args.corrective_from,
            geometry_steps=args.geometry_steps, dense_weight=args.dense_weight, lr=args.lr,
            warmup=args.warmup, init=args.init,
            save_every=args.save_every, log_every=args.log_every, eval_every=args.eval_every,
        )
        result = train(settings, args.out, resume=args.resume, minutes=args.minutes, device=args.device,
                       workers=args.workers, extend=args.extend, restart_peak=args.restart_lr)
        if result.export is not None:
            check_export(result.export, print)
    except (ValueError, FileNotFoundError) as error:
        print(f"samcore.training: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("samcore.training: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


def export_run(out_dir: str | Path) -> Path:
    """Export the weights of a run's last checkpoint, for a look at a run that is not finished."""
    out = Path(out_dir)
    state, settings, model = _load_run(out)
    seconds = float(state.get("seconds", 0.0))
    device = str(state.get("device", "unknown device"))
    return export_with_notes(model, out, settings, int(state["step"]), seconds, device)


def evaluate_run(out_dir: str | Path, scenes: int) -> dict[str, float]:
    """Validate a run's last checkpoint on `scenes` synthetic validation scenes."""
    _, settings, model = _load_run(Path(out_dir))
    return validate(model, settings, torch.device("cpu"), scenes=scenes)


def _load_run(out: Path) -> tuple[dict, TrainSettings, Sam]:
    """A run's last checkpoint: its saved state, its settings and its model."""
    state = load_state(out / STATE_NAME)
    settings = TrainSettings.from_dict(state["settings"])
    model = build_sam(settings.arch)
    model.load_state_dict(state["model"])
    return state, settings, model


def check_export(path: Path, log: Callable[[str], None]) -> None:
    """Load the exported file the way users will and report what was recognised."""
    from ..loading import load_model

    model = load_model(checkpoint=path, device="cpu")
    log(f"{path} loads with samcore.load_model as {model.architecture or 'a SAM'} "
        f"({count_parameters(model) / 1e6:.2f} M parameters, img_size {model.img_size}).")
