"""Long work as generators: they yield `Progress` between steps and return their result.

A caller shows progress and cancels by no longer asking for the next step (the napari plugin runs
such a generator in a `thread_worker`); `run` drives one to its end for scripts and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One finished step of a long job.

    Attributes:
        stage: What is being done: "embedding" (one slice embedded), "masks" (one batch of point
            prompts decoded), "prompts" (an object's prompts on a slice decoded), "slices" (one
            slice segmented), "linking" or "download" (bytes of a model's weights).
        done: Steps of this stage finished so far.
        total: Steps of this stage in all (0 when not known beforehand).
        z: The slice the step was about, if any.
    """

    stage: str
    done: int
    total: int
    z: int | None = None


Job = Generator[Progress, None, T]


def run(job: Job[T], on_progress: Callable[[Progress], None] | None = None) -> T:
    """Drive a job to its end and return its result, passing every step to `on_progress`."""
    while True:
        try:
            step = next(job)
        except StopIteration as finished:
            return finished.value
        if on_progress is not None:
            on_progress(step)


def restepped(job: Job[T], change: Callable[[Progress], Progress]) -> Job[T]:
    """`job` with each of its steps passed through `change`; it returns the job's result."""
    while True:
        try:
            step = next(job)
        except StopIteration as finished:
            return finished.value
        yield change(step)


def counted_on(job: Job[T], before: int, total: int) -> Job[T]:
    """`job` as one part of a larger one: its steps counted on from `before` earlier steps, out of
    `total`; it returns the part's result."""
    return restepped(job, lambda step: replace(step, done=before + step.done, total=total))
