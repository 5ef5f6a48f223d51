"""The training loop (its command line, ``python -m samcore.training``, is `command`).

Every step generates `scenes` new images (nothing is precomputed), embeds them once, and runs
the interactive prompting rounds of `interactive.interactive_step` on `objects` objects per
image. AdamW with warm-up and cosine decay, gradient clipping. All randomness of a step derives
from (seed, step), so a resumed run computes exactly what an uninterrupted one would have.

Files in the output folder: ``last.pt`` (resumable state, rewritten every `save_every` steps and
at the end), ``log.jsonl`` (one line per logged step and per validation) and, at the end,
``<arch>.pt``: the weights as a plain float16 state dict for `samcore.load_model(checkpoint=...)`,
with ``<arch>.json`` beside it: steps, training time (all sessions) and settings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..build import build_sam
from ..device import select_device
from ..modeling import Sam
from .batches import EVAL_FAMILIES, Batch, make_batch, make_eval_batches
from .checkpoints import STATE_NAME, cpu_state_dict, export_weights, load_state, save_state, training_state
from .geometry import pretrain_decoder
from .interactive import DenseHead, evaluate_prompts, interactive_step
from .losses import focal_ramp
from .schedule import WarmupCosine
from .settings import TrainSettings

CALIBRATION_STEPS = 8  # a timed run fixes its schedule length after this many steps
EXPORT_RESERVE_S = 30.0  # time kept free at the end of a timed run for validation and export


@dataclass
class TrainResult:
    """What a call of `train` did.

    Attributes:
        step: Completed steps (including those of earlier sessions).
        settings: The run's settings (total_steps fixed).
        history: One dict per step of this session: step, loss, its parts, train IoUs, lr.
        validation: Metrics of the last validation (empty if none ran).
        export: The exported weight file, or None.
    """

    step: int
    settings: TrainSettings
    history: list[dict[str, float]] = field(default_factory=list)
    validation: dict[str, float] = field(default_factory=dict)
    export: Path | None = None


def train(
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    resume: bool = False,
    minutes: float | None = None,
    device: str = "auto",
    workers: int = 0,
    stop_at: int | None = None,
    repeat_batches: int = 0,
    export: bool = True,
    extend: int = 0,
    restart_peak: float = 0.25,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train (or continue training) a SAM on generated scenes.

    Args:
        settings: The run's settings; on resume those stored in the checkpoint are used.
        out_dir: Folder for checkpoints, logs and the exported weights.
        resume: Continue from ``out_dir/last.pt``.
        minutes: Wall-clock budget of this session; with ``settings.total_steps == 0`` the
            schedule length is fixed from the speed of the first steps.
        device: "auto", "cpu", "cuda", ... (see `samcore.device.select_device`).
        workers: Processes generating batches ahead (0: in the training process).
        stop_at: Stop (saving a checkpoint, skipping the final validation) once this many steps
            are complete, before the end of the schedule; for interrupting runs on purpose.
        repeat_batches: 0 for a fresh batch every step; n > 0 cycles through the first n
            batches (an overfitting check).
        export: Write the float16 weight file at the end.
        extend: With `resume`, add this many steps to the run's schedule, restarting the
            learning rate (warm-up to `restart_peak` times the peak, cosine decay to the floor).
            The first steps of the run compute what they did before; the new ones draw new data.
        restart_peak: Peak of the restarted learning rate, relative to the run's `lr`.
        log: Receives the progress lines.

    Returns:
        What was done.
    """
    started = time.monotonic()
    out = Path(out_dir)
    state_path = out / STATE_NAME
    if not resume and state_path.exists():
        raise ValueError(f"{out} already holds a training run ({STATE_NAME}); use --resume or another --out.")
    if extend and not resume:
        raise ValueError("Only a resumed run can be extended: add --resume.")
    if extend < 0:
        raise ValueError(f"extend must be 0 or more steps, not {extend}.")
    state = load_state(state_path) if resume else None
    if state is not None:
        settings = TrainSettings.from_dict(state["settings"])
        if extend:
            if settings.total_steps == 0:
                raise ValueError("The run has no fixed schedule yet; resume it once before extending it.")
            settings = settings.replace(
                restarts=(*settings.restarts, (settings.total_steps, restart_peak)),
                total_steps=settings.total_steps + extend,
            )
    if settings.total_steps == 0 and minutes is None:
        raise ValueError("Give a number of steps or a time budget in minutes (or both).")
    target = select_device(device)
    torch.manual_seed(settings.seed)
    model = build_sam(settings.arch).to(target).train()
    if settings.size > model.img_size:
        raise ValueError(
            f"Scenes of {settings.size} px do not fit the {model.img_size} px input of {settings.arch}."
        )
    if state is None and settings.init:
        load_initial_weights(model, settings.init, settings.arch)
        log(f"Starting from the weights of {settings.init}.")
    if state is None and settings.geometry_steps:
        log(f"Warming up the decoder on prompt geometry for {settings.geometry_steps} steps.")
        pretrain_decoder(model, settings.geometry_steps, settings.seed, log=log)
    dense_head = DenseHead(model).to(target) if settings.dense_weight > 0 else None
    trained = nn.ModuleList([model] if dense_head is None else [model, dense_head])
    optimizer = make_optimizer(trained, settings)
    schedule = WarmupCosine(settings.warmup, max(settings.total_steps, 1), settings.lr_floor)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        if dense_head is not None:
            dense_head.load_state_dict(state["dense_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        if settings.restarts:  # rebuilt from the settings: the saved schedule may predate an extension
            schedule.set_restarts(settings.restarts, settings.total_steps)
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base * schedule(step)
        log(f"Resuming {settings.arch} at step {step} of {settings.total_steps} from {state_path}.")
    else:
        out.mkdir(parents=True, exist_ok=True)
        log(f"Training {settings.arch} ({count_parameters(model) / 1e6:.2f} M parameters) on {target}; "
            f"settings: {json.dumps(settings.to_dict())}")
    deadline = None if minutes is None else started + 60.0 * minutes - EXPORT_RESERVE_S
    earlier = float(state.get("seconds", 0.0)) if state is not None else 0.0
    clock = (earlier, started)
    loop = _Loop(model, dense_head, optimizer, scheduler, schedule, settings, target, out, log, clock)
    result = loop.run(step, deadline, stop_at, repeat_batches, workers)
    if stop_at is None:
        result.validation = validate(model, result.settings, target)
        loop.record({"validation_step": result.step, **result.validation})
        log(f"validation at step {result.step}: {format_metrics(result.validation)}")
    if export:
        seconds = loop.seconds()
        result.export = export_with_notes(model, out, result.settings, result.step, seconds, str(target))
        log(f"Exported {result.export} ({result.export.stat().st_size / 1e6:.1f} MB, float16).")
    return result


def load_initial_weights(model: Sam, init: str, arch: str) -> None:
    """Copy into `model` the weights of a model name or a weight file of architecture `arch`."""
    from ..loading import load_model

    if _is_weight_file(init):
        source = load_model(arch, checkpoint=init, device="cpu")  # refuses another architecture
    else:
        source = load_model(init, device="cpu")
        if source.architecture != arch:
            raise ValueError(f"The model {init} is a {source.architecture}; this run trains {arch}.")
    model.load_state_dict({name: value.float() for name, value in source.state_dict().items()})


def initial_weights_notes(init: str) -> dict[str, Any] | None:
    """The training notes (``<name>.json`` beside the weights) of the weights a run started from."""
    from .. import download, zoo

    path = Path(init) if _is_weight_file(init) else download.cached_path(zoo.get_entry(init))
    notes = path.with_suffix(".json")
    return json.loads(notes.read_text(encoding="utf-8")) if notes.is_file() else None


def _is_weight_file(init: str) -> bool:
    return Path(init).suffix in {".pt", ".pth"} or Path(init).exists()


class _Loop:
    """The step loop of one session (kept apart from set-up and export)."""

    def __init__(
        self,
        model: Sam,
        dense_head: DenseHead | None,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        schedule: WarmupCosine,
        settings: TrainSettings,
        device: torch.device,
        out: Path,
        log: Callable[[str], None],
        clock: tuple[float, float],
    ) -> None:
        self.model, self.dense_head = model, dense_head
        self.optimizer, self.scheduler, self.schedule = optimizer, scheduler, schedule
        self.settings, self.device, self.out, self.log = settings, device, out, log
        self.clock = clock  # seconds of earlier sessions, start of this one (time.monotonic)

    def seconds(self) -> float:
        """Training time of the run so far, earlier sessions included."""
        earlier, since = self.clock
        return earlier + time.monotonic() - since

    def run(
        self, step: int, deadline: float | None, stop_at: int | None, repeat: int, workers: int
    ) -> TrainResult:
        """Steps from `step` until the schedule ends, `stop_at`, or the deadline; then a checkpoint."""
        history: list[dict[str, float]] = []
        first_step, tic, window = step, time.monotonic(), []
        calibrate_from = None
        batches = batch_stream(self.settings, step, repeat, workers)
        while self.settings.total_steps == 0 or step < self.settings.total_steps:
            if stop_at is not None and step >= stop_at:
                break
            if deadline is not None and time.monotonic() >= deadline:
                self.log(f"Time budget reached after step {step}.")
                break
            entry = self.step(step, next(batches).to(self.device))
            step += 1
            history.append(entry)
            window.append(entry)
            if self.settings.total_steps == 0:
                calibrate_from = self._calibrate(step, first_step, calibrate_from, deadline)
            if step % self.settings.log_every == 0 or step == self.settings.total_steps:
                self._report(step, window, (time.monotonic() - tic) / len(window))
                tic, window = time.monotonic(), []
            if step % self.settings.save_every == 0:
                self.save(step)
            due = self.settings.eval_every and step % self.settings.eval_every == 0
            if due and step < self.settings.total_steps:
                metrics = validate(self.model, self.settings, self.device)
                self.record({"validation_step": step, **metrics})
                self.log(f"validation at step {step}: {format_metrics(metrics)}")
        self.save(step)
        return TrainResult(step, self.settings, history)

    def step(self, step: int, batch: Batch) -> dict[str, float]:
        """One optimisation step; returns its log entry."""
        seed = self.settings.seed
        choices = np.random.default_rng([seed, step, 2])
        use_box = bool(choices.random() < self.settings.box_fraction)
        most = self.settings.max_corrective if step >= self.settings.corrective_from else 0
        corrective = int(choices.integers(1, most + 1)) if most else 0
        generator = torch.Generator(device=self.device).manual_seed(prompt_seed(seed, step))
        self.model.train()
        loss_size = self.settings.loss_size or None
        window = self.settings.focal_window or None
        weight = focal_ramp(step, self.settings.focal_ramp)
        output = interactive_step(
            self.model, batch, use_box, corrective, generator, loss_size,
            focal_window=window, focal_weight=weight, dense_head=self.dense_head,
            dense_weight=self.settings.dense_weight,
        )
        self.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        return {
            "step": step + 1,
            "loss": float(output.loss.detach()),
            "focal": float(output.last.focal),
            "dice": float(output.last.dice),
            "iou_mse": float(output.last.iou_mse),
            "regions": float(output.regions),
            "iou_first": float(output.first.iou),
            "iou_last": float(output.last.iou),
            "grad_norm": float(grad_norm),
            "focal_weight": weight,
            "lr": lr,
            "box": float(use_box),
            "rounds": float(output.rounds),
        }

    def save(self, step: int) -> None:
        settings = self.settings.to_dict()
        state = training_state(self.model, self.optimizer, self.scheduler, step, settings)
        state["seconds"] = self.seconds()
        state["device"] = str(self.device)
        if self.dense_head is not None:
            state["dense_head"] = cpu_state_dict(self.dense_head)
        save_state(self.out / STATE_NAME, state)

    def record(self, entry: dict[str, Any]) -> None:
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as stream:
            stream.write(json.dumps(entry) + "\n")

    def _calibrate(
        self, step: int, first_step: int, since: float | None, deadline: float | None
    ) -> float | None:
        """Fix the schedule length of a timed run from the speed of its first steps."""
        if step - first_step == 2:
            return time.monotonic()  # the first steps are slower (allocation, warm-up)
        if since is None or step - first_step < CALIBRATION_STEPS or deadline is None:
            return since
        per_step = (time.monotonic() - since) / (step - first_step - 2)
        per_step *= 1.03  # checkpoints and validations
        total = step + max(1, int((deadline - time.monotonic()) / per_step))
        self.settings = self.settings.replace(total_steps=total)
        self.schedule.set_total(total)
        self.log(f"Speed {1 / per_step:.2f} steps/s: the schedule is fixed at {total} steps.")
        return since

    def _report(self, step: int, window: list[dict[str, float]], seconds_per_step: float) -> None:
        mean = {key: float(np.mean([entry[key] for entry in window])) for key in window[0]}
        mean["step"] = step
        mean["steps_per_s"] = 1.0 / seconds_per_step
        self.record(mean)
        total = self.settings.total_steps or "?"
        self.log(
            f"step {step}/{total} | loss {mean['loss']:.4f} (focal {mean['focal']:.4f} "
            f"dice {mean['dice']:.3f} iou-mse {mean['iou_mse']:.4f} regions {mean['regions']:.3f}) "
            f"| train IoU first {mean['iou_first']:.3f} last {mean['iou_last']:.3f} | lr {mean['lr']:.2e} "
            f"| {mean['steps_per_s']:.2f} steps/s"
        )


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices and kernels only (not norms, biases, tokens)."""
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    decay, plain = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and id(param) not in embeddings else plain).append(param)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999))


def prompt_seed(seed: int, step: int) -> int:
    """Seed of a step's prompt generator."""
    return (seed * 1_000_003 + step * 7919 + 12345) % (2**63 - 1)


def batch_stream(settings: TrainSettings, start: int, repeat: int, workers: int) -> Iterator[Batch]:
    """Batches for steps start, start + 1, ... (cycling over `repeat` batches if > 0)."""

    def data_step(step: int) -> int:
        return step % repeat if repeat > 0 else step

    if workers <= 0:
        s = settings
        return (make_batch(s.seed, data_step(i), s.scenes, s.objects, s.size, s.zoom_ramp) for i in range(start, 2**62))
    steps = _StepBatches(settings, start, data_step)
    loader = torch.utils.data.DataLoader(steps, batch_size=None, num_workers=workers, prefetch_factor=2)
    return iter(loader)


class _StepBatches(torch.utils.data.IterableDataset):
    """Batches by step for worker processes; worker w makes every workers-th step."""

    def __init__(self, settings: TrainSettings, start: int, data_step: Callable[[int], int]) -> None:
        self.settings, self.start, self.data_step = settings, start, data_step

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        offset, stride = (0, 1) if info is None else (info.id, info.num_workers)
        s = self.settings
        for step in range(self.start + offset, 2**62, stride):
            yield make_batch(s.seed, self.data_step(step), s.scenes, s.objects, s.size, s.zoom_ramp)


def validate(
    model: Sam, settings: TrainSettings, device: torch.device, scenes: int = len(EVAL_FAMILIES)
) -> dict[str, float]:
    """Mean IoUs on the fixed synthetic validation set: box, one click, and for nuclei only.

    `scenes` sets the size of the set; training validates on the first few scenes, and
    `evaluate_run` on more, where differences between checkpoints must stand out from noise.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(2024)
    results: dict[str, list[torch.Tensor]] = {}
    for batch in make_eval_batches(settings.size, objects=settings.objects, scenes=scenes):
        batch = batch.to(device)
        ious = evaluate_prompts(model, batch, generator)
        is_nuclei = [batch.families[i] == "nuclei" for i in batch.image_index.tolist()]
        nuclei = torch.tensor(is_nuclei, device=device)
        for name, values in ious.items():
            results.setdefault(name, []).append(values)
            results.setdefault(f"nuclei_{name}", []).append(values[nuclei])
    model.train(was_training)
    return {name: float(torch.cat(values).mean()) for name, values in results.items()}


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} IoU {value:.3f}" for name, value in metrics.items())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_with_notes(
    model: Sam, out: Path, settings: TrainSettings, step: int, seconds: float, device: str
) -> Path:
    """Write ``<arch>.pt`` (float16 weights) and ``<arch>.json`` (steps, time, settings) into `out`."""
    path = export_weights(model, out / f"{settings.arch}.pt")
    notes: dict[str, Any] = {
        "architecture": settings.arch,
        "steps": step,
        "train_seconds": round(seconds, 1),
        "device": device,
        "settings": settings.to_dict(),
    }
    if settings.init:  # the lineage: what the run started from, and the training of both together
        earlier = initial_weights_notes(settings.init)
        notes["started_from"] = {"weights": settings.init, "notes": earlier}
        if earlier is not None:
            notes["steps_in_all"] = step + earlier.get("steps_in_all", earlier.get("steps", 0))
            before = earlier.get("train_seconds_in_all", earlier.get("train_seconds", 0.0))
            notes["train_seconds_in_all"] = round(seconds + before, 1)
    path.with_suffix(".json").write_text(json.dumps(notes, indent=1) + "\n", encoding="utf-8")
    return path


__all__ = ["TrainResult", "export_with_notes", "train", "validate"]
