"""The interactive SAM widget: click or draw a box, see the mask, commit it as a new object.

Everything long (loading weights, computing embeddings) runs in a `thread_worker`; decoding a
prompt takes milliseconds and runs on the main thread, so the preview follows every click.
The same actions are methods (`load`, `segment`, `commit`, `next_candidate`, `undo`, `clear`,
`propagate`, `segment_all`) for napari's console and notebooks.
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton, create_widget,
)
from napari.layers import Image, Labels, Points, Shapes
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import QSizePolicy

from ._annotations import Commit, commit_mask, undo_commit
from ._autosave import (
    OBJECTS_KEY,
    Autosave, autosave_dir, earlier_autosaves, erased_slices, forget_erased, note_erased, painted_rows,
    touched_rows, unwatch_history, watch_history,
)
from ._candidates import Candidates
from ._embedding_job import EmbeddingJob, Session
from ._prompt_layers import PromptLayers, align_with, placement
from ._prompts import POSITIVE, spatial_ndim
from ._propagate import Propagation
from ._segment_all import SCOPES, AutoSegmentation
from ._zoom import ZoomJob

if TYPE_CHECKING:
    from collections.abc import Iterable

    import napari
    from samcore.propagation import PropagationSettings

CHECKPOINT_CHOICE = "checkpoint file…"
# The views menu: (label, Predictor views), 0 for the model's own number (2 for the bundled model).
VIEW_CHOICES = [
    ("model's choice", 0), ("1: the image", 1), ("2: + mirror image", 2), ("4: + 3 mirror images", 4),
]
# How long the slider must rest on a slice without an embedding before the embedding job restarts there.
REFOCUS_MS = 250
# Images whose embeddings are kept in memory after the picker moves on: going back to one of them
# computes nothing. The newest are kept, at most KEEP_EARLIER of them, while their embeddings add up to
# at most KEEP_EARLIER_BYTES (about 2 MB per slice and view in float16: two 60-slice stacks of two
# views fill it); the newest one is kept whatever its size.
KEEP_EARLIER = 8
KEEP_EARLIER_BYTES = 2**30
# An image layer's events that move it in the world; the SAM layers follow them.
PLACEMENT = ("scale", "translate", "rotate", "shear", "affine")
KEYS = {
    "s": ("segment", "update the preview"),
    "c": ("commit", "commit the preview as a new object"),
    "t": ("toggle_polarity", "next clicks positive / negative"),
    "n": ("next_candidate", "next of the 3 candidate masks"),
    "Shift-C": ("clear", "clear the prompts"),
    "u": ("undo", "undo the last commit"),
    "Shift-P": ("propagate", "propagate this slice's objects through the stack"),
}


def help_text() -> str:
    """The widget's help: how to prompt, then the keys in a table (spaces cannot line them up in the
    dock's proportional font)."""
    rows = "".join(
        f"<tr><td align='right'><b>{key.upper() if len(key) == 1 else key}</b>&nbsp;&nbsp;</td>"
        f"<td>{html.escape(action)}</td></tr>"
        for key, (_, action) in KEYS.items()
    )
    # Paragraphs without Qt's default margins: the dock does not scroll, and a short window cuts its end.
    return (
        "<p style='margin:0'>Click in 'SAM points', draw rectangles in 'SAM boxes', or paint roughly over an "
        f"object in 'SAM brush'.</p><table cellspacing='0' cellpadding='0'>{rows}</table>"
        "<p style='margin:4px 0 0 0'>In the SAM layers, napari's own S, P, Shift-P and T keep their "
        "meaning.</p>"
    )


# napari's own keys for the layer types of the SAM layers (napari.utils.shortcuts): in those layers they
# keep napari's meaning (S selects points, P paints in the brush layer, T draws paths...), not ours.
NAPARI_LAYER_KEYS = {
    Points: {"s", "p"},
    Shapes: {"s", "p", "t", "Shift-P"},
    Labels: {"p"},
}


def _objects_image(layer, key: str = "image") -> str | None:
    """The unique id of the image an objects layer was made for by the widget, or None; with `key`
    "image_name", the name of the image of an objects layer opened from an autosave."""
    made = layer.metadata.get(OBJECTS_KEY) if isinstance(layer, Labels) else None
    return made.get(key) if isinstance(made, dict) else None


def model_choices() -> list[str]:
    """Model names for the picker: the bundled default first, then the registry, then a file."""
    from samcore.zoo import DEFAULT_MODEL_NAME, model_names

    names = [name for name in model_names() if name != DEFAULT_MODEL_NAME]
    return [DEFAULT_MODEL_NAME, *names, CHECKPOINT_CHOICE]


class SamWidget(Container):
    """Segment Anything on the selected image layer, slice by slice.

    Args:
        viewer: The napari viewer the widget works in.
    """

    _said_deleted = False  # the status line says the image was deleted (kept on the picker's change)
    _said_view_problem = False  # the status line says the viewer shows no Y-X slice (`view_problem`)
    _advised_view = False  # and the advice in full was shown (at the first prompt in that view)

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self._image = create_widget(annotation=Image, label="image")
        self._model = ComboBox(label="model", choices=model_choices())
        self._checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.pt *.pth *.ckpt", visible=False)
        self._device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"])
        self._views = ComboBox(
            label="views", choices=VIEW_CHOICES, value=0,
            tooltip="average the masks of the image and its mirror images: better masks where one view's "
            "spill into a neighbour, at one more embedding and decoding per view",
        )
        self._cache_dir = FileEdit(label="disk cache", mode="d", value="", tooltip="optional zarr folder for embeddings")
        self._load_button = PushButton(text="Compute embeddings")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._output = create_widget(  # the labels layers, less the widget's own
            annotation=Labels | None, label="objects",
            options={"nullable": True, "choices": self._objects_choices},
        )
        self._overwrite = CheckBox(text="overwrite other objects", value=False)
        # Set to the model's own choice when a model is chosen (on for the bundled model).
        self._refine = CheckBox(
            text="refine masks (second decoder pass)", value=False,
            tooltip="decode each prompt again with its first mask as input: better masks from a click "
            "with the bundled model, at twice the decoding time",
        )
        self._refine.changed.connect(self.segment)
        self._zoom = CheckBox(
            text="zoom in (small boxes, clicks on large images)", value=False,
            tooltip="decode a box around a small object again on the crop around it, enlarged, and clicks "
            "on an image over twice the model's input size on a crop of that size around them: finer "
            "outlines of small nuclei, at one more embedding (in the background) per box or place clicked",
        )
        self._zoom.changed.connect(self.segment)
        self._fade = CheckBox(
            text="end propagated objects where they fade", value=True,
            tooltip="propagate: stop an object on the slice where it stands out from its surroundings by "
            "less than half its contrast on the slice it started from (a nucleus out of focus); "
            "untick for objects meant to dim along z",
        )
        self._autosave = Autosave()
        self._told_autosaves: set[str] = set()  # images whose earlier autosaves were pointed out
        self._autosave_box = CheckBox(
            text="autosave objects", value=True,
            tooltip=f"write the objects layer to {autosave_dir()} as it changes (what SAM adds or removes "
            "and your brush strokes), to get it back after a crash: open the .sam.zarr folder in napari",
        )
        self._candidate = Label(value="")
        self._status = Label(value="Pick an image and a model, then compute embeddings.")
        self._help = Label(value=help_text())
        self._help.native.setTextFormat(Qt.RichText)  # the keys in a column of their own
        for line in (self._candidate, self._status, self._help):  # a long line wraps: the dock stays narrow
            line.native.setWordWrap(True)
            line.native.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        # Two rows of three: one row of six made the dock wider than its other rows need.
        buttons = [Container(layout="horizontal", labels=False) for _ in range(2)]
        for row in buttons:
            row.margins = (0, 0, 0, 0)
        for index, name in enumerate(("segment", "commit", "next_candidate", "undo", "clear", "propagate")):
            button = PushButton(text=name.replace("_", " "))
            button.changed.connect(getattr(self, name))
            buttons[index // 3].append(button)
        self._scope = ComboBox(choices=[(text, scope) for scope, text in SCOPES.items()])
        segment_all = PushButton(text="segment all", tooltip="find every object automatically")
        segment_all.changed.connect(self.segment_all)
        automatic = Container(layout="horizontal", labels=False, label="automatic")
        automatic.extend([segment_all, self._scope])
        # Segment all keeps a candidate mask when both pass; set to the model's own values when it is chosen.
        self._min_iou = FloatSpinBox(
            label="IoU ≥", min=0.0, max=1.0, step=0.05, value=0.88,
            tooltip="segment all keeps a mask whose predicted IoU is at least this: lower it to keep more "
            "(and worse) masks",
        )
        self._min_stability = FloatSpinBox(
            label="stability ≥", min=0.0, max=1.0, step=0.05, value=0.95,
            tooltip="segment all: lower it on dim or noisy images, where masks are less stable",
        )
        for spin in (self._min_iou, self._min_stability):  # wide enough for 0.05 and its - and + buttons
            spin.native.setMaximumWidth(110)
        thresholds = Container(layout="horizontal", label="keep if")
        thresholds.extend([self._min_iou, self._min_stability])
        self.extend([
            self._image, self._model, self._checkpoint, self._device, self._views, self._cache_dir,
            self._load_button, self._cancel_button, self._output, self._overwrite, self._autosave_box,
            self._refine, self._zoom, self._fade, *buttons, automatic, thresholds, self._candidate,
            self._status, self._help,
        ])
        self._candidate.visible = False  # see `_say_candidate`
        self._model.changed.connect(self._on_model_choice)
        self._checkpoint.changed.connect(self._on_checkpoint_choice)
        self._image.changed.connect(self._on_image_change)
        self._views.changed.connect(lambda: self._forget("Views changed: compute embeddings again.", True))
        self._device.changed.connect(lambda: self._forget("Device changed: compute embeddings again.", True))
        self._load_button.changed.connect(self.load)
        self._cancel_button.changed.connect(self.cancel)
        self._viewer.dims.events.current_step.connect(self._on_slice_change)
        self._viewer.dims.events.order.connect(self._on_view_change)
        self._viewer.dims.events.ndisplay.connect(self._on_view_change)
        self._viewer.layers.events.removed.connect(self._on_layer_removed)

        self._session: Session | None = None  # samcore objects for the current (image, model)
        self._refocus = QTimer()  # the embeddings follow the displayed slice once the slider rests
        self._refocus.setSingleShot(True)
        self._refocus.setInterval(REFOCUS_MS)
        self._refocus.timeout.connect(self._embed_displayed_first)
        self._prepare = QTimer()  # the displayed slice's decoding is made ready once the slider rests
        self._prepare.setSingleShot(True)
        self._prepare.setInterval(REFOCUS_MS)
        self._prepare.timeout.connect(self._prepare_displayed)
        # The sessions of the last images the picker moved away from, newest last: picking one of
        # them again takes up its embeddings (and any model already loaded is not loaded again).
        self._earlier: list[Session] = []
        self._embedding = EmbeddingJob(self)
        self._prompt_layers = PromptLayers(viewer, self.segment, self._bind_layer_keys)
        self._candidates: Candidates | None = None  # of the prompts on the displayed slice
        # Undo steps: the objects layer, the array the step wrote into, and what it wrote.
        self._history: list[tuple[Labels, np.ndarray, Commit]] = []
        self._propagation = Propagation(self)
        self.propagation_settings = None  # a samcore PropagationSettings; None for its defaults
        self._automatic = AutoSegmentation(self)
        self._zoom_job = ZoomJob(self)
        self._closed = False
        self._deleted_own: list[str] = []  # SAM layers the user deleted, to make again
        self._placed: Image | None = None  # the image whose placement in the world the SAM layers follow
        self._objects_of: dict[str, Labels | None] = {}  # image id: the objects layer chosen for it
        self._prompt_status: str | None = None  # what `segment` last said about the prompts, if still shown
        self._status_before_prompts = ""  # the status line it replaced
        self._output.changed.connect(self._on_objects_choice)
        self._output.value = self._objects_layer_for(self._image.value)
        self._watch_strokes(self._output.value)
        self.auto_settings = None  # a samcore AutoSettings for segment all; None: the threshold boxes
        self._defaults_for: str | None = None  # the model whose own thresholds and refine are shown
        self._show_registry_defaults(self._model.value)
        self._bind_keys()
        self._close_watch = _CloseWatch(self.native, self._on_closed)

    # -- scripting ----------------------------------------------------------------------------

    def reset_choices(self, *args) -> None:
        """Refresh the layer pickers (napari calls this as layers come, go and are renamed).

        magicgui matches the old choices with the new by name, so a renamed layer would drop out of
        its picker (the image picker would jump to another image); the picked layers are kept.
        """
        pickers = (self._image, self._output)
        before = [picker.value for picker in pickers]
        known = list(self._output.choices)
        with self._image.changed.blocked(), self._output.changed.blocked():
            super().reset_choices(*args)
            for picker, value in zip(pickers, before):
                if value is not None and value in self._viewer.layers and picker.value is not value:
                    picker.value = value
            image = self._image.value
            if self._output.value is None and image is not None:  # an autosave of its objects, just opened
                opened = [layer for layer in self._restored(image) if layer not in known]
                if opened:
                    self._output.value = opened[-1]
        for picker, value in zip(pickers, before):
            if picker.value is not value:
                picker.changed.emit(picker.value)

    def _objects_choices(self, _widget=None) -> list[tuple[str, Labels]]:
        """The labels layers objects may be committed to: all but the widget's own preview and brush."""
        own = getattr(self, "_prompt_layers", None)  # None while __init__ makes the widgets
        return [
            (layer.name, layer) for layer in self._viewer.layers
            if isinstance(layer, Labels) and (own is None or not own.owns(layer))
        ]

    def set_model(
        self,
        name: str | None = None,
        checkpoint: str | Path | None = None,
        device: str | None = None,
        views: int | None = None,
    ) -> None:
        """Choose the model by registry name or weight file (and optionally the device and the number
        of views, 1, 2 or 4; 0 for the model's own)."""
        if checkpoint is not None:
            self._model.value = CHECKPOINT_CHOICE
            self._checkpoint.value = str(checkpoint)
        elif name is not None:
            if name not in self._model.choices:
                raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(self._model.choices[:-1])}.")
            self._model.value = name
        if device is not None:
            self._device.value = device
        if views is not None:
            allowed = [value for _, value in VIEW_CHOICES]
            if views not in allowed:
                choices = ", ".join(map(str, allowed))
                raise ValueError(f"views must be one of {choices} (0: the model's choice), not {views!r}.")
            self._views.value = views

    def add_point(self, position, positive: bool = True) -> None:
        """Click at `position` ((z, y, x) or (y, x) in world coordinates), like a user would."""
        self._prompt_layers_for(self.image_layer()).add_point(position, positive)

    def add_box(self, corner, opposite) -> None:
        """Draw a box between two corners ((z, y, x) or (y, x) world coordinates, same z)."""
        self._prompt_layers_for(self.image_layer()).add_box(corner, opposite)

    def paint(self, mask, z: int | None = None) -> None:
        """Paint a (Y, X) bool mask on slice z of the brush layer (2D: z None) as a mask prompt."""
        self._prompt_layers_for(self.image_layer()).paint(mask, z)
        self.segment()

    # -- set-up ---------------------------------------------------------------------------

    def _on_model_choice(self, choice: str) -> None:
        self._checkpoint.visible = choice == CHECKPOINT_CHOICE
        self._show_registry_defaults(choice)
        self._forget("Model changed: compute embeddings with it.", everything=True)

    def _on_checkpoint_choice(self, _=None) -> None:
        self._defaults_for = None  # the file's own settings are shown once it is loaded (`_on_session`)

    def _show_registry_defaults(self, choice: str) -> None:
        """Show the segment-all thresholds and refine choice of a model from its registry entry.

        A weight file shows SAM's until it is loaded; then its own (`samcore.load_model`: SAM's for
        SAM's architectures, the bundled model's kind of settings for a model trained here).
        """
        from samcore.zoo import SAM_THRESHOLDS, get_entry

        entry = None if choice == CHECKPOINT_CHOICE else get_entry(choice)
        thresholds = entry.auto_thresholds if entry is not None and entry.auto_thresholds else SAM_THRESHOLDS
        own = entry is not None
        self._show_model_defaults(choice, thresholds, own and entry.refine, own and entry.zoom)
        if entry is None:
            self._defaults_for = None

    def _show_model_defaults(
        self, name: str, thresholds: tuple[float, float], refine: bool, zoom: bool
    ) -> None:
        """Set the "keep if" thresholds, "refine masks" and "zoom in" to the model's own.

        They then stay as the user sets them until another model is chosen (see `_on_session`).
        """
        self._defaults_for = name
        self._min_iou.value, self._min_stability.value = thresholds
        self._refine.value = refine
        self._zoom.value = zoom

    def _on_image_change(self, _=None) -> None:
        image = self._image.value
        self._output.value = self._objects_layer_for(image)
        owner = self._prompt_layers.owner
        aside = self._prompt_layers.switch(image) if image is not None and self._prompt_layers.layers() else 0
        session = self._session
        if session is not None and session.layer not in self._viewer.layers:  # the picker moved on from it
            self._forget_deleted(session.layer)
        elif session is not None or self._embedding.running or not self._said_deleted:
            self._forget("Image changed: compute embeddings for it.")
            if session is not None:
                self._earlier = [earlier for earlier in self._earlier if earlier.layer != session.layer]
                self._earlier.append(session)
            self._take_up_earlier()
            self._earlier = newest_within_budget(self._earlier)  # the one taken up is not among them
        # else: the image was deleted, and the status line says so (`_on_layer_removed` ran first)
        if aside:
            before = next(layer.name for layer in self._viewer.layers if layer.unique_id == owner)
            what = f"{aside} prompts not committed on '{before}' are" if aside > 1 else (
                f"prompt not committed on '{before}' is"
            )
            comes = "they come" if aside > 1 else "it comes"
            self._status.value += f" The {what} kept for it: {comes} back when you pick it again."
        cover = None if image is None else covering_image(self._viewer.layers, image)
        if cover is not None:
            self._status.value += (
                f" '{image.name}' lies under '{cover.name}', which hides it: hide '{cover.name}' or move "
                f"'{image.name}' above it to see what you segment."
            )

    def _objects_layer_for(self, image: Image | None) -> Labels | None:
        """The objects layer to show in the picker for `image`: the one last chosen for it, else the
        newest one the widget made for it (by this widget or one closed before), else None (a new one).

        Objects belong to an image: another image's layer may not fit, and would mix two images' objects.
        """
        if image is None:
            return None
        made = [layer for layer in self._viewer.layers if _objects_image(layer) == image.unique_id]
        restored = self._restored(image)
        for layer in (self._objects_of.get(image.unique_id), *reversed(made), *reversed(restored)):
            if layer is not None and layer in self._viewer.layers and not self._prompt_layers.owns(layer):
                return layer
        return None

    def _restored(self, image: Image) -> list[Labels]:
        """Objects layers opened from an autosave of `image`'s objects (by its name) that fit it."""
        shape = image.data.shape[: spatial_ndim(image)]
        return [
            layer for layer in self._viewer.layers
            if _objects_image(layer, "image_name") == image.name and layer.data.shape == shape
        ]

    def _on_objects_choice(self, layer: Labels | None) -> None:
        image = self._image.value
        if image is not None:
            self._objects_of[image.unique_id] = layer
        self._watch_strokes(layer)

    def _watch_strokes(self, layer: Labels | None) -> None:
        """Autosave the user's own strokes in a chosen objects layer from now on, not only once SAM has
        written into it in this session (a reopened widget, a layer of the user's)."""
        if isinstance(layer, Labels) and not self._closed:
            layer.events.paint.connect(self._on_paint)  # once: napari ignores a callback connected again
            watch_history(layer, self._on_history)  # Ctrl-Z and Ctrl-Shift-Z send no paint event

    def _image_of_objects(self, layer: Labels) -> Image | None:
        """The image whose objects `layer` holds: the one the widget made it for, else the one it was
        chosen for, else the one picked."""
        images = {image.unique_id: image for image in self._viewer.layers if isinstance(image, Image)}
        made = _objects_image(layer)
        if made in images:
            return images[made]
        chosen = [images[key] for key, objects in self._objects_of.items() if objects is layer and key in images]
        return chosen[-1] if chosen else self._image.value

    def _follow_placement(self, image: Image) -> None:
        """Keep the SAM layers (and the objects layers made for `image`) where `image` is in the world,
        when the user sets its pixel size, offset or rotation."""
        if self._placed is image:
            return
        self._stop_following()
        for name in PLACEMENT:
            getattr(image.events, name).connect(self._on_placement)
        self._placed = image

    def _stop_following(self) -> None:
        if self._placed is not None:
            for name in PLACEMENT:
                getattr(self._placed.events, name).disconnect(self._on_placement)
            self._placed = None

    def _on_placement(self, _event=None) -> None:
        image = self._placed
        if image is None:
            return
        self._prompt_layers.align(image)
        for layer in self._viewer.layers:
            if _objects_image(layer) == image.unique_id:
                align_with(layer, image)

    def _take_up_earlier(self) -> None:
        """If the picked image had a session before, make it current again and embed what it lacks."""
        layer = self._image.value
        earlier = next((session for session in self._earlier if session.layer == layer), None)
        if earlier is None:
            return
        self._earlier.remove(earlier)
        self._session = earlier  # `load` keeps it if the model, the settings and the data are the same
        self.load()
        if self._session is earlier:
            self.segment()  # the prompts brought back with the image, on a slice embedded before

    def _loaded_model(self, model_source, device: str):
        """The model of a kept session with these weights on this device, so as not to load it twice.

        None if there is none, or if the checkpoint file was written since that session began.
        """
        checkpoint = model_source[1]
        for session in [*self._earlier, self._session]:
            if session is None or (session.model_source, session.settings[0]) != (model_source, device):
                continue
            if checkpoint is not None and Path(checkpoint).stat().st_mtime > session.created:
                continue
            return session.predictor.model
        return None

    def _on_layer_removed(self, event) -> None:
        """Stop what works on a deleted layer: its image's embeddings, a job painting into it, its undo."""
        layer = event.value  # compared with ==: the widget may hold napari's proxy of the same layer
        embedding = self._session.layer if self._session is not None else self._embedding.layer
        working = self._session is not None or self._embedding.running
        if embedding is not None and layer == embedding and working:
            self._forget_deleted(layer)
        self._earlier = [session for session in self._earlier if session.layer != layer]
        if isinstance(layer, Image):
            self._prompt_layers.drop_aside(layer)
        for job in (self._propagation, self._automatic):
            job.forget_layer(layer)
        self._history = [step for step in self._history if step[0] != layer]
        deleted = self._prompt_layers.forget(layer)
        if deleted is not None:  # a SAM layer: its prompts stop counting, and an empty one comes back
            self._candidates = None
            self._deleted_own.append(deleted)
            QTimer.singleShot(0, self._restore_prompt_layers)

    def _alive(self) -> bool:
        """Whether Qt still holds the widget (closing the viewer deletes it, and removes the layers after)."""
        try:
            self.native.objectName()
        except RuntimeError:
            return False
        return True

    def _restore_prompt_layers(self) -> None:
        """Make again the SAM layers the user deleted, empty, and say what became of their prompts."""
        names, self._deleted_own = self._deleted_own, []
        if self._closed or not names or not self._alive():
            return
        image = self._session.layer if self._session is not None else self._image.value
        if image is None or image not in self._viewer.layers:
            return
        active = self._viewer.layers.selection.active  # napari selects a new layer: keep the user's one
        try:
            self._prompt_layers_for(image)
        except ValueError:  # the image is no longer one SAM works on: nothing to prompt on
            return
        if active is not None and active in self._viewer.layers:
            self._viewer.layers.selection.active = active
        quoted = " and ".join(f"'{name}'" for name in names)
        self._status.value = f"{quoted} deleted: {'their' if len(names) > 1 else 'its'} prompts are gone."
        self.segment()

    def _on_image_data(self, _event=None) -> None:
        """An image layer's data was replaced: the session's embeddings no longer belong to it."""
        session = self._session
        if session is not None and session.layer.data is not session.source:
            self._forget_changed()

    def _forget_changed(self) -> None:
        """The session's image was replaced or edited: its embeddings no longer belong to it."""
        self._forget(f"The data of '{self._session.layer.name}' changed: compute embeddings again.")

    def _on_closed(self) -> None:
        """The dock was closed: stop the background work and give napari its keys back."""
        self._closed = True
        self._refocus.stop()
        self._prepare.stop()
        self._stop_following()
        self._cancel_jobs("(the SAM widget was closed)")
        self.cancel()
        self._unbind_keys()
        self._prompt_layers.clear_preview()
        self._prompt_layers.release()
        self._viewer.dims.events.current_step.disconnect(self._on_slice_change)
        self._viewer.dims.events.order.disconnect(self._on_view_change)
        self._viewer.dims.events.ndisplay.disconnect(self._on_view_change)
        self._viewer.layers.events.removed.disconnect(self._on_layer_removed)
        for layer in self._viewer.layers:  # brush strokes are no longer autosaved
            if isinstance(layer, Labels):
                layer.events.paint.disconnect(self._on_paint)
                unwatch_history(layer)
        self._session = None
        self._earlier = []

    def _forget_deleted(self, layer: Image) -> None:
        self._forget(f"The image '{layer.name}' was deleted: pick an image and compute embeddings.")
        self._said_deleted = True

    def _forget(self, status: str, everything: bool = False) -> None:
        """Drop the current session (its embeddings belong to another image or model); with
        `everything`, the earlier images' sessions too (the model or its settings changed)."""
        if everything:
            self._earlier = []
        self._said_deleted = self._said_view_problem = self._advised_view = False
        reason = status.split(":")[0]  # "Model changed", "The image 'cells' was deleted", ...
        self._cancel_jobs(f"({reason[0].lower()}{reason[1:]})")
        self.cancel()
        self._session = None
        self._candidates = None
        self._prompt_layers.clear_preview()
        self._say_candidate("")
        self._status.value = status

    def image_layer(self) -> Image:
        """The selected image layer; raises ValueError with a message for the user if unusable."""
        layer = self._image.value
        if layer is None:
            raise ValueError("Open an image first, then pick it in the SAM widget.")
        spatial = spatial_ndim(layer)
        if spatial not in (2, 3):
            raise ValueError(
                f"'{layer.name}' has {layer.data.ndim} dimensions; SAM works on 2D images and 3D (Z, Y, X) "
                "stacks. Split channels or time points into separate layers first."
            )
        from samcore.embeddings import channels_last

        shape = layer.data.shape[:spatial]
        if spatial == 3 and channels_last(shape):
            raise ValueError(
                f"'{layer.name}' has shape {shape}: its last axis is {shape[-1]} long, so it looks like "
                "channels rather than X. Open the image with channel_axis=-1 (one layer per channel) and pick "
                "a channel, or make it RGB."
            )
        return layer

    def load(self, _=None, *, block: bool = False) -> None:
        """Load the model and compute embeddings, displayed slice first, in the background.

        Args:
            block: Wait until every embedding is computed (for scripts and tests).
        """
        try:
            layer = self.image_layer()
            model_source = self._model_source()
        except ValueError as error:
            show_error(str(error))
            self._status.value = str(error)
            return
        self._cancel_jobs("to compute embeddings")
        self.cancel()
        told = self._session is not None and self._session.layer == layer  # at this image's first load
        if spatial_ndim(layer) == 3 and 1 < layer.data.shape[0] <= 4 and not told:
            show_info(
                f"SAM: '{layer.name}' is taken as a stack of {layer.data.shape[0]} slices. If they are "
                "channels, open the image with channel_axis (one layer per channel) and pick one."
            )
        self._prompt_layers_for(layer)
        self._tell_earlier_autosaves(layer)
        self._embedding.start(layer, model_source, (self._device.value, self._views.value or None))
        if block:
            self.wait()

    def _model_source(self) -> tuple[str | None, str | None]:
        if self._model.value != CHECKPOINT_CHOICE:
            return self._model.value, None
        path = Path(self._checkpoint.value)
        if not str(self._checkpoint.value) or not path.is_file():
            raise ValueError("Choose a checkpoint file, or pick a model by name.")
        return None, str(path)

    def _embedding_cache(self) -> str | None:
        """The disk cache folder for embeddings, if one is chosen."""
        value = str(self._cache_dir.value)
        return None if value in ("", ".") else value

    def cancel(self, _=None) -> None:
        """Stop computing embeddings, propagating or segmenting all (what is done is kept).

        A slice being embedded, or a box's crop, is abandoned part-way, so this returns within a
        fraction of a second even with SAM's ViT-H on a CPU.
        """
        self._propagation.cancel()
        self._automatic.cancel()
        self._embedding.quit()
        self._zoom_job.cancel()
        self.wait()

    def _running_job(self) -> str | None:
        """The name of the running job on the objects layer (propagation, segment all), if any."""
        if self._propagation.running:
            return "propagation"
        return "segment all" if self._automatic.running else None

    def _cancel_jobs(self, why: str) -> None:
        """Cancel a running propagation or segment all, and say so and `why`."""
        job = self._running_job()
        if job is not None:
            self._propagation.cancel()
            self._automatic.cancel()
            self.wait()
            show_info(f"SAM: {job} cancelled {why}; the objects it found so far are kept.")

    def _tell(self, message: str, level: str = "info") -> None:
        """A notification ("SAM: " + message) at `level` (info, warning, error), and the status line."""
        {"info": show_info, "warning": show_warning, "error": show_error}[level](f"SAM: {message}")
        self._status.value = message[0].upper() + message[1:]

    def _refuse_while_job_runs(self, action: str) -> bool:
        """Whether a propagation or segment all is running, which `action` would disturb (after a message)."""
        job = self._running_job()
        if job is None:
            return False
        message = f"{job} is running; wait for it to finish or press Cancel, then {action}."
        show_warning(f"SAM: {message}")
        self._status.value = message[0].upper() + message[1:]
        return True

    def _busy(self) -> bool:
        """Whether any background work is running."""
        return self._embedding.running or self._propagation.running or self._automatic.running

    def wait(self, timeout_ms: int = 600_000) -> None:
        """Block until the background work has stopped, processing Qt events meanwhile."""
        from qtpy.QtCore import QCoreApplication, QElapsedTimer

        timer = QElapsedTimer()
        timer.start()
        while (self._busy() or self._zoom_job.running) and timer.elapsed() < timeout_ms:
            QCoreApplication.processEvents()
            self._worker_thread_sleep()

    @staticmethod
    def _worker_thread_sleep() -> None:
        import time

        time.sleep(0.005)

    def _on_session(self, session: Session) -> None:
        """The embedding job loaded the model (or kept it): say so, show the model's own settings."""
        session.layer.events.data.connect(self._on_image_data)  # connected once, however often called
        predictor = session.predictor
        views = "" if predictor.views == 1 else f", {predictor.views} mirrored views"
        self._status.value = f"Model {session.model_name} on {predictor.device}{views}; computing embeddings…"
        # The model's own settings, unless they are shown already: the user's values stay.
        name = session.model_source[0] or CHECKPOINT_CHOICE
        if name != self._defaults_for:
            from samcore.automatic import AutoSettings

            own = AutoSettings().resolved(predictor.model)
            thresholds = (own.min_predicted_iou, own.min_stability)
            self._show_model_defaults(name, thresholds, predictor.refine, predictor.zoom)

    def _on_error(self, error: Exception) -> None:
        """A background job failed: tell the user, and keep the error in the status line."""
        show_error(f"SAM: {error}")
        self._status.value = f"Error: {error}"

    # -- prompts and preview ----------------------------------------------------------------

    def _prompt_layers_for(self, image: Image) -> PromptLayers:
        """The prompt and preview layers, made for `image` or re-aligned with it."""
        self._prompt_layers.ensure(image)
        self._follow_placement(image)
        return self._prompt_layers

    def _on_slice_change(self, _=None) -> None:
        session = self._session
        if session is None:
            return
        self._candidates = None
        z = self._current_z(session.layer)
        if session.stale([z or 0]):
            self._forget_changed()
            return
        if z is not None and z not in session.store and self._embedding.running:
            self._refocus.start()  # (again): once the slider rests, embed this slice next
        self._prepare.start()  # (again)
        self.segment()

    def _embed_displayed_first(self) -> None:
        """Compute the slice the user is looking at next, then continue outwards from it.

        Called once the slider has rested for `REFOCUS_MS`: restarting the job at every step of a
        scroll through the stack held each step for a fifth of a second.
        """
        session = self._session
        z = None if session is None else self._current_z(session.layer)
        if z is None or z in session.store or not self._embedding.running:
            return
        self._embedding.quit()
        self.wait()
        self._embedding.start(session.layer, session.model_source, session.settings)

    def _prepare_displayed(self) -> None:
        """Make the displayed slice's decoder contexts while the user looks at it: the first click on
        a slice otherwise waits for them (about as long again as the click itself, per view).

        Called once the slider has rested for `REFOCUS_MS`, and when background work ends; not while
        any runs. Made on this thread, it competed with the worker for the cores: while a stack was
        embedded with the bundled model, the viewer's longest stall was 109 and 129 ms with it against
        25 to 45 ms without (2-core EPYC). A click meanwhile makes the contexts itself.
        """
        session = self._session
        if session is None or self._closed or self._busy() or self._zoom_job.running:
            return
        z = self._current_z(session.layer)
        if session.stale([z or 0]) or self.view_problem(session.layer) is not None:
            return
        embedding = session.store.get(z or 0)
        if embedding is None:
            return
        session.use(z or 0, embedding, pixels=self._zoom.value)  # as `segment` will
        session.predictor.prepare_decoding()

    def _on_view_change(self, _=None) -> None:
        """The viewer turned to another plane or to 3D: say why prompts wait, or take them up again."""
        session = self._session
        if session is None:
            return
        problem = self.view_problem(session.layer)
        if problem is not None:
            self._candidates = None
            self._prompt_layers.clear_preview()
            self._say_candidate("")
            self._status.value = problem[0]  # the advice in full comes with the first prompt there
            self._said_view_problem = True
        elif self._said_view_problem:
            self._said_view_problem = self._advised_view = False
            self._status.value = f"Y-X slices shown again: prompts on slice {self._current_z(session.layer)}."
            self.segment()

    def _tell_view_problem(self, status: str, advice: str) -> None:
        """The status line, and the advice in full once (not at every click in the same view)."""
        self._status.value = status
        if not self._advised_view:
            show_info(f"SAM: {advice}")
        self._said_view_problem = self._advised_view = True

    def view_problem(self, layer: Image | None) -> tuple[str, str] | None:
        """Why the viewer shows no Y-X slice of the stack `layer` to prompt on: a status line and
        the advice in full; None when it shows one.

        SAM segments the slices of a (Z, Y, X) stack. A click in a side view (the axes rolled or
        transposed so that Z is on screen) or in the 3D view lands on no single slice.
        """
        if layer is None or spatial_ndim(layer) == 2:
            return None
        dims = self._viewer.dims
        if dims.ndisplay == 3:
            return "3D view: switch to 2D to prompt on a slice.", (
                "the viewer is in 3D, and SAM segments one slice at a time. Switch to the 2D view (the "
                "square button at the bottom left) to click or draw on a slice."
            )
        if set(dims.displayed) != {dims.ndim - 2, dims.ndim - 1}:
            names = dict(zip(range(dims.ndim - 3, dims.ndim), "ZYX"))  # the stack's axes, trailing
            shown = ", ".join(names.get(axis, str(dims.axis_labels[axis])) for axis in dims.displayed)
            return f"Side view ({shown}): show Y and X to prompt on a slice.", (
                f"the viewer shows a side view of '{layer.name}' (axes {shown}), and SAM segments its "
                "Y-X slices. Press the roll or transpose button (bottom left) until the slider moves "
                "through the slices."
            )
        return None

    def _current_z(self, layer: Image | None) -> int | None:
        if layer is None or spatial_ndim(layer) == 2:
            return None
        world = self._viewer.dims.point
        z = layer.world_to_data(world[-layer.ndim:])[0]
        return int(np.clip(round(z), 0, layer.data.shape[0] - 1))

    def toggle_polarity(self, _=None) -> None:
        """Switch between placing positive and negative clicks."""
        positive = self._prompt_layers.toggle_polarity() == POSITIVE
        show_info("SAM: next clicks are " + ("positive" if positive else "negative"))

    def segment(self, _=None) -> None:
        """Predict the mask of the current prompts on the displayed slice into the preview layer."""
        session = self._session
        if session is None or self._prompt_layers.preview is None:
            if session is None and not self._embedding.running and self._prompt_layers.preview is not None:
                self._status.value = "No embeddings yet: press Compute embeddings."
            return
        z = self._current_z(session.layer)
        if session.stale([z or 0]):  # edited in place, or replaced before the session began
            self._forget_changed()
            return
        problem = self.view_problem(session.layer)
        if problem is not None:  # a click in a side view or in 3D lands on no slice
            self._tell_view_problem(*problem)
            return
        prompts = self._prompt_layers.prompts(session.layer, z)
        if prompts.empty:
            self._candidates = None
            self._show_candidate(z)
            if prompts.open_shapes:
                self._say_of_prompts("Lines are not prompts: draw a rectangle around the object.")
            else:
                self._prompts_fine()
            return
        embedding = session.store.get(z or 0)
        if embedding is None:
            where = "The image" if z is None else f"Slice {z}"
            self._say_of_prompts(
                f"{where} has no embedding yet; it is being computed." if self._busy()
                else f"{where} has no embedding: press Compute embeddings."
            )
            return
        session.use(z or 0, embedding, pixels=self._zoom.value)
        single_click = len(prompts.points) == 1 and prompts.box is None and prompts.mask is None
        try:
            # A painted mask prompts with its bounding box (unless a box is drawn) and as SAM's
            # mask input: a mask input alone decodes poorly.
            prompt = {
                "point_coords": prompts.points if len(prompts.points) else None,
                "point_labels": prompts.labels if len(prompts.points) else None,
                "box": prompts.decoder_box(),
            }
            mask_input = None if prompts.mask is None else session.predictor.logits_from_mask(prompts.mask)
            # A small box, or clicks on a large image, are decoded on a crop around them once it is
            # embedded (in the background).
            window = None
            if self._zoom.value:
                window = session.predictor.zoom_window(prompt["box"], prompt["point_coords"])
            zoomed = window is not None and session.predictor.has_crop(window)
            # Clicks alone are decoded on their crop as on the whole image; a box's crop is pasted on
            # background at full resolution.
            on_crop = zoomed and window.clicks and mask_input is None
            decoder = session.predictor.crop_decoder(window) if on_crop else session.predictor
            # A click's candidates are refined when shown (see `Candidates`).
            lazy = self._refine.value and single_click
            decoded = {"mask_input": mask_input, "multimask_output": single_click,
                       "refine": self._refine.value and not lazy}
            masks = None  # made when shown, from the logits (see `Candidates`)
            if zoomed and not on_crop:
                masks, scores, low_res = session.predictor.predict(**prompt, **decoded, zoom=True)
            else:
                scores, low_res = decoder.predict_logits(**prompt, **decoded)
        except ValueError as error:
            show_warning(f"SAM: {error}")
            return
        self._prompts_fine()
        if window is not None and not zoomed:
            self._zoom_job.start(session.predictor, window)
        self._candidates = Candidates(scores, low_res, decoder, masks, zoomed, prompt if lazy else None)
        self._candidates.refine_shown()
        self._show_candidate(z)

    def _say_of_prompts(self, message: str) -> None:
        """Say in the status line why the prompts give no preview, until they give one (`_prompts_fine`)."""
        if self._prompt_status is None or self._status.value != self._prompt_status:
            self._status_before_prompts = self._status.value
        self._status.value = self._prompt_status = message

    def _prompts_fine(self) -> None:
        """The prompts give a preview (or there are none): what the status line said of them goes."""
        if self._prompt_status is not None and self._status.value == self._prompt_status:
            self._status.value = self._status_before_prompts
        self._prompt_status = None

    def _show_candidate(self, z: int | None) -> None:
        """Draw the shown candidate on slice z of the preview while z is the displayed slice; else none."""
        if self._candidates is not None and z != self._current_z(self._session.layer if self._session else None):
            self._candidates = None
        candidates = self._candidates
        self._prompt_layers.show_preview(None if candidates is None else candidates.shown, z)
        self._say_candidate("" if candidates is None else candidates.describe(self._zoom_job.running))

    def _say_candidate(self, text: str) -> None:
        """The candidate line, shown only while it says something: the dock does not scroll, and in a
        short window an empty line would push the end of the help out of sight."""
        self._candidate.value = text
        self._candidate.visible = bool(text)

    def next_candidate(self, _=None) -> None:
        """Show the next of the candidate masks of an ambiguous single click."""
        if self._candidates is None or not self._candidates.next():
            return
        # The predictor still holds this slice: a slice change drops the candidates.
        self._candidates.refine_shown()
        self._show_candidate(self._current_z(self._session.layer))

    # -- committing -------------------------------------------------------------------------

    def output_layer(self) -> Labels:
        """The labels layer objects are committed to: the chosen one, else a new one."""
        layer = self._output.value
        shape = self._prompt_layers.preview.data.shape
        if layer is not None and layer in self._viewer.layers:
            if layer.data.shape != shape:
                raise ValueError(
                    f"the objects layer '{layer.name}' has shape {layer.data.shape}, the image {shape}. "
                    "Choose another objects layer, or none for a new one."
                )
            editable(layer)
            return layer
        image = self._session.layer
        active = self._viewer.layers.selection.active  # napari selects a new layer: keep the user's one
        layer = self._viewer.add_labels(
            np.zeros(shape, np.uint32), name="SAM objects",
            metadata={OBJECTS_KEY: {"image": image.unique_id}}, **placement(image),
        )
        if active is not None and active in self._viewer.layers:
            self._viewer.layers.selection.active = active  # the next click still adds a point
        self._output.reset_choices()
        self._output.value = layer
        return layer

    def _autosave_objects(
        self, layer: Labels, index: np.ndarray | None = None, rows: np.ndarray | None = None
    ) -> None:
        """Write what changed in the objects layer `layer` to the autosave folder, in the background.

        Args:
            layer: A labels layer held in memory.
            index: Flat indices into its array that changed; with `rows`, None means all of it.
            rows: The positions along its first axis that changed (slices, or rows of a 2D image).
        """
        if not self._autosave_box.value:
            return
        for error in self._autosave.errors():
            show_warning(f"SAM: autosave failed ({error}); save the objects layer yourself (File > Save).")
        data = np.asarray(layer.data)
        if index is not None:
            rows = touched_rows(index, data.shape)
        image = self._image_of_objects(layer)
        path, first, earlier = self._autosave.save(
            data, image.name if image is not None else "image", layer.name, rows, erased_slices(layer)
        )
        if first:
            kept = " (the autosave found there is kept beside it, named with its time)" if earlier else ""
            show_info(
                f"SAM: the objects of '{layer.name}' are autosaved to {path} as they change{kept}; if "
                "napari closes before you save them, open that folder in napari to get them back."
            )
            layer.events.paint.connect(self._on_paint)  # `first` comes once per layer and session
            watch_history(layer, self._on_history)

    def _tell_earlier_autosaves(self, image: Image) -> None:
        """Once per image: say where autosaves of its objects from earlier sessions are, if there are any."""
        if not self._autosave_box.value or image.name in self._told_autosaves:
            return
        self._told_autosaves.add(image.name)
        found = [path for path in earlier_autosaves(image.name) if path not in self._autosave.written]
        if found:
            newest = max(found, key=lambda path: path.stat().st_mtime)
            show_info(
                f"SAM: {len(found)} autosave(s) of objects drawn on '{image.name}' are in {newest.parent}, the "
                f"newest '{newest.name}'. If napari closed before you saved your objects, open it in napari."
            )

    def _on_paint(self, event) -> None:
        """A brush stroke, fill or erase in an autosaved objects layer: write the rows it changed.

        napari sends the event before it writes the new pixels, so they are read once it is handled.
        """
        layer, rows = event.source, painted_rows(event.value, event.source.data.shape)
        before = self._objects_on(layer, rows)

        def written() -> None:
            if layer not in self._viewer.layers:
                return
            self._note_erased(layer, before)
            if self._autosave_box.value:
                self._autosave_objects(layer, rows=rows)

        QTimer.singleShot(0, written)

    @staticmethod
    def _objects_on(layer: Labels, rows) -> dict[int, list[int]]:
        """The objects on each slice a stroke is about to change, in a 3D objects layer."""
        from samcore.propagation import object_ids_in

        if layer.data.ndim != 3 or rows is None or len(rows) > 8:  # a fill over many slices: not a hand edit
            return {}
        return {int(z): object_ids_in(np.asarray(layer.data[z])) for z in rows}

    def _note_erased(self, layer: Labels, before: dict[int, list[int]]) -> None:
        """Remember each object that a stroke removed from a slice entirely (see `erased_slices`)."""
        from samcore.propagation import object_ids_in

        for z, ids in before.items():
            gone = set(ids) - set(object_ids_in(np.asarray(layer.data[z])))
            for object_id in gone:
                note_erased(layer, object_id, z)

    @staticmethod
    def erased_slices(layer: Labels) -> dict[int, list[int]]:
        """Object id -> the slices of `layer` where the user erased it by hand since it was made.

        Propagation keeps each object out of them (where it has no pixels again by then). They are kept
        in the layer's metadata, so a reopened widget and a layer opened from its autosave know them.
        """
        return erased_slices(layer)

    def _on_history(self, layer: Labels) -> None:
        """napari's undo or redo in an autosaved objects layer: write it whole (which rows changed is
        napari's to know)."""
        if self._autosave_box.value and not self._closed and layer in self._viewer.layers:
            self._autosave_objects(layer)

    def commit(self, _=None) -> None:
        """Make the preview a new object in the output labels layer, then clear the prompts."""
        if self._candidates is None:
            if self._session is None:
                self._tell("no embeddings yet; press Compute embeddings, then click on an object.", "warning")
            else:
                self._tell("nothing to commit; click on an object or draw a box first.", "warning")
            return
        if self._refuse_while_job_runs("commit"):
            return
        if not self._candidates.shown.any():
            self._tell("the mask is empty, nothing to commit; move the click or box, or add clicks.",
                       "warning")
            return
        # Taken now: making the objects layer can move napari's slider, which drops the candidates.
        z, mask = self._current_z(self._session.layer), self._candidates.shown
        try:
            layer = self.output_layer()
            done = commit_mask(layer.data, mask, () if z is None else (z,), self._overwrite.value)
        except ValueError as error:
            self._tell(str(error), "error")
            return
        if done is None:
            self._tell("the preview only covers existing objects; tick 'overwrite' to replace them.",
                       "warning")
            return
        self._history.append((layer, layer.data, done))
        forget_erased(layer, done.object_id)  # a new object under an old id
        layer.refresh()
        self._autosave_objects(layer, done.index)
        self.clear()
        self._status.value = f"Committed object {done.object_id}."

    def undo(self, _=None) -> None:
        """Remove the last object SAM committed (or the last propagation or segment all) in the chosen
        objects layer, restoring what it covered."""
        if self._refuse_while_job_runs("undo"):
            return
        chosen = self._output.value
        # Compared with ==: napari hands a plugin its layers behind proxies, so `is` can tell one apart.
        steps = [i for i, step in enumerate(self._history) if chosen is not None and step[0] == chosen]
        if not steps:  # another image's objects layer may have steps: they are undone with it chosen
            self._tell("nothing to undo." if chosen is None else f"nothing to undo in '{chosen.name}'.")
            return
        layer, written_to, done = self._history.pop(steps[-1])
        if layer.data is not written_to:  # replaced since: the step's pixels index another array
            self._history = [step for step in self._history if step[0] != layer]
            self._tell(f"nothing undone: the data of '{layer.name}' was replaced since SAM last wrote to it.",
                       "warning")
            return
        kept = undo_commit(layer.data, done)
        layer.refresh()
        self._autosave_objects(layer, done.index)
        what = f"the {done.note}" if done.note else f"object {done.object_id}"
        if kept == done.index.size:
            self._status.value = f"Nothing of {what} was left to undo: all its pixels were edited since."
            return
        self._status.value = f"Undid the {done.note}." if done.note else f"Removed object {done.object_id}."
        if kept:
            self._status.value += f" {kept} of its pixels, edited since, were kept."

    def propagate(self, object_ids: Iterable[int] | None = None, *, block: bool = False) -> None:
        """Propagate objects of the objects layer through the stack, in the background.

        Args:
            object_ids: The objects to propagate; default those on the displayed slice.
            block: Wait until the propagation has finished (for scripts and tests).
        """
        if isinstance(object_ids, bool):
            object_ids = None  # the button's click
        if self._propagation.running:
            show_info("SAM: a propagation is already running.")
            return
        if self._automatic.running:
            show_info("SAM: segment all is running; wait for it or cancel it first.")
            return
        if self._propagation.start(object_ids, self._propagation_settings()) and block:
            self.wait()

    def _propagation_settings(self) -> PropagationSettings | None:
        """`propagation_settings` (None: the engine's defaults), without the contrast rule when unticked."""
        if self._fade.value:
            return self.propagation_settings
        from samcore.propagation import PropagationSettings

        return dataclasses.replace(self.propagation_settings or PropagationSettings(), min_contrast=0.0)

    def segment_all(self, scope: str | None = None, *, block: bool = False) -> None:
        """Find every object automatically and add them as new objects, in the background.

        New objects get ids above the largest of the objects layer and fill only background pixels,
        so existing objects are kept; through a stack, the objects of adjacent slices are linked into
        3D objects. One undo removes them all.

        Args:
            scope: "slice" (the displayed slice; a 2D image is one slice) or "stack" (every slice);
                default the widget's choice.
            block: Wait until it has finished (for scripts and tests).
        """
        if scope is None or isinstance(scope, bool):
            scope = self._scope.value  # the button's click
        if scope not in SCOPES:
            raise ValueError(f"Segment all works on the displayed 'slice' or on the 'stack', not {scope!r}.")
        if self._automatic.running:
            show_info("SAM: segment all is already running.")
            return
        if self._propagation.running:
            show_info("SAM: a propagation is running; wait for it or cancel it first.")
            return
        from samcore.automatic import AutoSettings

        settings = self.auto_settings
        if settings is None and self._session is not None:
            settings = AutoSettings.for_model(
                self._session.predictor.model,
                min_predicted_iou=self._min_iou.value,
                min_stability=self._min_stability.value,
            )
        if self._automatic.start(scope, settings) and block:
            self.wait()

    def clear(self, _=None) -> None:
        """Remove the prompts of the displayed slice and the preview."""
        z = self._current_z(self._session.layer) if self._session else None
        self._zoom_job.cancel()  # a crop being embedded is of no use without its box
        self._prompt_layers.clear(z)
        self._candidates = None
        self._prompts_fine()
        if self._prompt_layers.preview is not None:
            self._show_candidate(z)

    # -- keys -------------------------------------------------------------------------------

    def _bind_keys(self) -> None:
        for key, (method, _) in KEYS.items():
            self._viewer.bind_key(key, self._key_handler(method), overwrite=True)

    def _bind_layer_keys(self, layer) -> None:
        # isinstance, not type(): napari hands plugins proxies of its layers.
        taken = next((keys for kind, keys in NAPARI_LAYER_KEYS.items() if isinstance(layer, kind)), set())
        for key, (method, _) in KEYS.items():
            if key not in taken:
                layer.bind_key(key, self._key_handler(method), overwrite=True)

    def _unbind_keys(self) -> None:
        """Remove this widget's keys from the viewer and the SAM layers (where they are still its own)."""
        layers = [layer for layer in self._prompt_layers.layers() if layer in self._viewer.layers]
        for owner in (self._viewer, *layers):
            for key, handler in list(owner.keymap.items()):
                if getattr(handler, "sam_widget", None) is self:
                    owner.bind_key(key, None)

    def _key_handler(self, method: str):
        def handler(_viewer_or_layer) -> None:
            getattr(self, method)()

        handler.__name__ = f"sam_{method}"
        handler.sam_widget = self  # whose key it is, to unbind it when the widget closes
        return handler


def newest_within_budget(sessions: list[Session]) -> list[Session]:
    """The newest of `sessions` (oldest first) to keep: see `KEEP_EARLIER_BYTES`."""
    kept: list[Session] = []
    total = 0
    for session in reversed(sessions):
        size = session.store.memory_bytes
        if kept and (len(kept) == KEEP_EARLIER or total + size > KEEP_EARLIER_BYTES):
            break
        kept.insert(0, session)
        total += size
    return kept


# Blendings that let an image hide the layers under it (additive and minimum mix them in).
HIDING_BLENDINGS = ("opaque", "translucent", "translucent_no_depth")


def covering_image(layers, image: Image) -> Image | None:
    """The topmost visible image above `image` in `layers` that hides it where they overlap (mostly
    opaque, not mixed in), if any: the user would see it instead of the image they segment."""
    if image not in layers:
        return None
    index = layers.index(image)
    low, high = (np.asarray(bound, float)[-2:] for bound in image.extent.world)
    for layer in reversed(list(layers)[index + 1 :]):
        if not isinstance(layer, Image) or not layer.visible or layer.opacity < 0.5:
            continue
        if str(layer.blending) not in HIDING_BLENDINGS:
            continue
        other_low, other_high = (np.asarray(bound, float)[-2:] for bound in layer.extent.world)
        if np.all(other_low < high) and np.all(low < other_high):
            return layer
    return None


def editable(layer: Labels) -> None:
    """Make sure objects can be written into `layer` in place; ValueError (for the user) if not.

    A NumPy array that is a strided view or read-only is replaced by a copy (the user's array is left
    as it was); lazy arrays (dask, zarr) are refused: writing into them would be lost or write to disk.
    """
    data = layer.data
    if not isinstance(data, np.ndarray):
        raise ValueError(
            f"The labels layer '{layer.name}' holds a {type(data).__name__}, not an array in memory, so "
            "SAM cannot add objects to it. Choose another objects layer (or none, for a new one), or "
            "load it into memory first (layer.data = numpy.asarray(layer.data))."
        )
    if not (data.flags.c_contiguous and data.flags.writeable):
        layer.data = np.array(data, order="C")
        show_info(f"SAM: '{layer.name}' was copied into a plain array so that objects can be added to it.")


class _CloseWatch(QObject):
    """Calls `on_closed` once the widget, after being docked, loses its parent (napari closed the dock)."""

    def __init__(self, widget, on_closed) -> None:
        super().__init__(widget)
        self._on_closed = on_closed
        self._docked = False
        widget.installEventFilter(self)

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.ParentChange:
            if watched.parent() is not None:
                self._docked = True
            elif self._docked:
                self._docked = False
                self._on_closed()
        return False
