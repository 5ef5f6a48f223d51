"""The settings of a training run: everything that decides what the run computes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainSettings:
    """Settings of a run, saved in its checkpoints and restored on resume.

    Attributes:
        arch: Architecture name in `samcore.build.ARCHITECTURES`.
        seed: Seed of the data stream, the prompts and the initial weights.
        total_steps: Length of the learning-rate schedule; 0 until fixed (a timed run fixes it
            from its measured speed).
        size: Side of the generated scenes in pixels (at most the model's img_size).
        loss_size: Side at which the mask losses are computed (ground truth area-averaged);
            0 for the scene size.
        focal_window: The focal loss is normalised over this many times each object's area
            (0: over the whole image, as SAM does).
        corrective_from: First step with corrective-click rounds; before it only the initial
            prompt is trained (fed-back masks of an untrained model teach it to copy them).
        zoom_ramp: Steps of the object-size curriculum (`batches.scene_zoom`); 0 for none.
        focal_ramp: Steps over which the focal weight rises from 0 to SAM's 20 (0: 20 at once).
        geometry_steps: Steps of the decoder's warm-up on prompt geometry before the first
            scene (`geometry.pretrain_decoder`); 0 for none.
        dense_weight: Weight of the loss of the dense foreground/edge head on the embeddings
            (`interactive.DenseHead`); 0 trains without the head.
        scenes: Scenes per step.
        objects: Objects prompted per scene.
        max_corrective: Corrective-click rounds per step are drawn from 1..max_corrective.
        box_fraction: Fraction of steps that start from boxes (the rest from one click).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to norms, biases and learned tokens).
        warmup: Warm-up steps.
        lr_floor: Final learning rate relative to `lr`.
        grad_clip: Maximum global gradient norm.
        save_every: Steps between checkpoints.
        log_every: Steps between progress lines.
        eval_every: Steps between validations on the fixed synthetic set (0: only at the end).
        restarts: (step, peak) of each restart of the learning rate, peak relative to `lr`;
            one per `train(extend=...)`.
        init: Weights the run starts from: a model name for `samcore.load_model` (e.g.
            "default") or a weight file; empty for random weights.
    """

    arch: str = "micro_v1"
    seed: int = 0
    total_steps: int = 0
    size: int = 256
    loss_size: int = 128
    focal_window: float = 0.0
    focal_ramp: int = 1000
    zoom_ramp: int = 1500
    corrective_from: int = 500
    geometry_steps: int = 3000
    dense_weight: float = 1.0
    scenes: int = 2
    objects: int = 8
    max_corrective: int = 3
    box_fraction: float = 0.5
    lr: float = 4e-4
    weight_decay: float = 0.05
    warmup: int = 150
    lr_floor: float = 0.05
    grad_clip: float = 1.0
    save_every: int = 100
    log_every: int = 10
    eval_every: int = 250
    restarts: tuple[tuple[int, float], ...] = ()
    init: str = ""

    def __post_init__(self) -> None:
        if self.scenes < 1 or self.objects < 1:
            raise ValueError(f"scenes and objects must be at least 1, not {self.scenes} and {self.objects}.")
        if self.max_corrective < 0:
            raise ValueError(f"max_corrective must be 0 or more, not {self.max_corrective}.")
        if not 0.0 <= self.box_fraction <= 1.0:
            raise ValueError(f"box_fraction must lie in [0, 1], not {self.box_fraction}.")
        if self.geometry_steps < 0:
            raise ValueError(f"geometry_steps must be 0 or more, not {self.geometry_steps}.")
        if self.dense_weight < 0:
            raise ValueError(f"dense_weight must be 0 or more, not {self.dense_weight}.")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError(f"lr and grad_clip must be positive, not {self.lr} and {self.grad_clip}.")
        steps = [at for at, _ in self.restarts]
        if steps != sorted(set(steps)) or any(at < 1 or not 0.0 < peak <= 1.0 for at, peak in self.restarts):
            raise ValueError(
                f"restarts must be (step, peak) pairs at increasing steps with peaks in (0, 1], not "
                f"{list(self.restarts)}."
            )
        if min(self.save_every, self.log_every) < 1 or self.eval_every < 0 or self.warmup < 0:
            raise ValueError("save_every and log_every must be at least 1; eval_every and warmup at least 0.")

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for checkpoints and logs."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainSettings:
        """Settings from `to_dict` output; unknown keys are refused."""
        values = dict(values)
        if "restart_at" in values:  # runs saved when a run could restart only once
            at, peak = values.pop("restart_at"), values.pop("restart_peak", 1.0)
            values["restarts"] = [(at, peak)] if at else []
        if "restarts" in values:  # saved as lists
            values["restarts"] = tuple((int(at), float(peak)) for at, peak in values["restarts"])
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown training settings: {', '.join(unknown)}.")
        return cls(**values)

    def replace(self, **changes: Any) -> TrainSettings:
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)
