"""The SAM widget's own layers over the image it segments: clicks, boxes, a brush and the preview.

The user prompts in the first three ("SAM points", "SAM boxes", "SAM brush"); the widget draws the
mask of the displayed slice into "SAM preview". They follow the image's scale and translate, so
prompts line up with it however the image is placed in the world. A widget opened again after its dock
was closed takes over the layers of that name it finds, instead of adding a second set.

Prompts belong to one image: when another image is picked, the clicks, boxes and painting not yet
committed are put aside for their image and come back when it is picked again (`switch`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Labels, Points, Shapes

from ._prompts import NEGATIVE, POSITIVE, SlicePrompts, slice_prompts, spatial_ndim

if TYPE_CHECKING:
    from collections.abc import Callable

    import napari
    from napari.layers import Image, Layer

POINT_COLORS = {POSITIVE: "lime", NEGATIVE: "red"}
# (attribute, layer name, napari layer type) of the widget's layers.
OWN_LAYERS = (("preview", "SAM preview", Labels), ("brush", "SAM brush", Labels),
              ("boxes", "SAM boxes", Shapes), ("points", "SAM points", Points))
PREVIEW_ID = 1


class PromptLayers:
    """The points, boxes, brush and preview layers of one widget.

    Args:
        viewer: The viewer the layers live in.
        on_change: Called after the user adds, moves or removes a prompt, or paints.
        bind_keys: Binds the widget's keys on a layer, so they work while it is selected.
    """

    def __init__(
        self, viewer: napari.viewer.Viewer, on_change: Callable[[], None], bind_keys: Callable[[Layer], None]
    ) -> None:
        self._viewer = viewer
        self._on_change = on_change
        self._bind_keys = bind_keys
        self.points = self.boxes = self.brush = self.preview = None
        self.polarity = POSITIVE  # of the next click
        self._preview_slice: int | None = None  # the slice the preview was last drawn on
        self._preview_empty = True  # nothing drawn since the preview was made or cleared
        self._owner: str | None = None  # unique id of the image the prompts in the layers belong to
        self._aside: dict[str, _Prompts] = {}  # other images' prompts, by unique id

    def ensure(self, image: Image) -> None:
        """Create the layers for `image`, or re-align the existing ones."""
        ndim = spatial_ndim(image)
        shape = image.data.shape[:ndim]
        viewer = self._viewer
        placed = placement(image)
        self._take_over_left_layers()
        self.switch(image)
        new_preview = not self._usable(self.preview, ndim) or self.preview.data.shape != shape
        if new_preview:
            self._remove(self.preview)
            self.preview = viewer.add_labels(
                np.zeros(shape, np.uint8), name="SAM preview", opacity=0.5, **placed
            )
            self._preview_slice, self._preview_empty = None, True
        if not self._usable(self.brush, ndim) or self.brush.data.shape != shape:
            self._remove(self.brush)
            self.brush = viewer.add_labels(
                np.zeros(shape, np.uint8), name="SAM brush", opacity=0.4, **placed
            )
            self._wire(self.brush)
        if not self._usable(self.boxes, ndim):
            self._remove(self.boxes)
            self.boxes = viewer.add_shapes(
                ndim=ndim, name="SAM boxes", edge_color="yellow", face_color="transparent", edge_width=2,
                **placed,
            )
            self._wire(self.boxes)
        if not self._usable(self.points, ndim):
            self._remove(self.points)
            self.points = viewer.add_points(
                ndim=ndim, name="SAM points", size=8, features={"label": np.zeros(0, int)}, **placed
            )
            self._wire(self.points)
        self._bring_back(image.unique_id)  # into layers made anew for its shape
        self.align(image)
        self.keep_above(image)

    def keep_above(self, image: Image) -> None:
        """Move these layers to the top of the layer list if `image` hides some of them (it was added or
        moved above them): prompts and preview drawn under the image would not be seen."""
        layers = self._viewer.layers
        own = [layer for layer in (self.preview, self.brush, self.boxes, self.points) if self._live(layer)]
        if not own or image not in layers or min(map(layers.index, own)) > layers.index(image):
            return
        for layer in own:  # in this order: the preview lowest, the clicks on top
            layers.move(layers.index(layer), len(layers))

    def switch(self, image: Image) -> int:
        """Make the prompts in the layers `image`'s: put aside those of the image they belonged to, and
        bring back those put aside for `image` where the layers fit them.

        Returns:
            How many clicks and boxes were put aside (a painting counts as one).
        """
        key = image.unique_id
        if key == self._owner:
            return 0
        if self._owner is None:  # the first image, or layers a closed widget left: what they hold is its
            self._owner = key
            self._bring_back(key)
            return 0
        kept = _Prompts.take(self)
        if kept.count:
            self._aside[self._owner] = kept
            self.clear(None)  # every slice's
        self._owner = key
        self._bring_back(key)
        self.keep_above(image)
        return kept.count

    @property
    def owner(self) -> str | None:
        """The unique id of the image the prompts in the layers belong to (None before the first)."""
        return self._owner

    def drop_aside(self, image: Layer) -> None:
        """Forget the prompts of `image` (deleted): those put aside, or those in the layers."""
        self._aside.pop(image.unique_id, None)
        if self._owner == image.unique_id:
            self.clear(None)
            self._owner = None

    def aside_for(self, image: Layer) -> int:
        """How many clicks and boxes are put aside for `image`."""
        kept = self._aside.get(image.unique_id)
        return 0 if kept is None else kept.count

    def _bring_back(self, key: str) -> None:
        kept = self._aside.get(key)
        if kept is not None and kept.restore(self):
            del self._aside[key]

    def align(self, image: Image) -> None:
        """Place the layers over `image` as it is placed in the world (its pixel size, offset, rotation)."""
        for layer in self.layers():
            align_with(layer, image)

    def _take_over_left_layers(self) -> None:
        """Take the layers a closed widget left (by name and type) for those not made yet."""
        for attribute, name, kind in OWN_LAYERS:
            if getattr(self, attribute) is not None or name not in self._viewer.layers:
                continue
            layer = self._viewer.layers[name]
            if isinstance(layer, kind):
                setattr(self, attribute, layer)
                if layer is not self.preview:
                    self._wire(layer)

    def _wire(self, layer: Layer) -> None:
        """Connect a prompt layer: its changes redraw the preview, and the widget's keys work in it."""
        if layer is self.brush:
            layer.mode = "paint"  # ready to paint once the user selects it
            layer.events.paint.connect(self._changed)
        layer.events.data.connect(self._changed)
        self._bind_keys(layer)
        if layer is self.points:
            self._style_new_points(self.polarity)
            layer.mode = "add"

    def release(self) -> None:
        """Disconnect the prompt layers from the widget (it was closed); the layers stay for another one."""
        for layer in (self.points, self.boxes, self.brush):
            if layer is not None:
                layer.events.data.disconnect(self._changed)
        if self.brush is not None:
            self.brush.events.paint.disconnect(self._changed)

    def layers(self) -> list[Layer]:
        """The layers made so far."""
        return [layer for layer in (self.points, self.boxes, self.brush, self.preview) if layer is not None]

    def forget(self, layer: Layer) -> str | None:
        """Let go of one of these layers, deleted by the user; its name, or None if it is not one of them."""
        for attribute, name, _ in OWN_LAYERS:
            own = getattr(self, attribute)
            if own is None or layer != own:
                continue
            if attribute != "preview":
                own.events.data.disconnect(self._changed)
                if attribute == "brush":
                    own.events.paint.disconnect(self._changed)
            else:
                self._preview_slice, self._preview_empty = None, True
            setattr(self, attribute, None)
            return name
        return None

    def owns(self, layer: Layer) -> bool:
        """Whether `layer` is one of these (compared with ==: napari may hand out a proxy of it)."""
        return any(layer == own for own in self.layers())

    def show_preview(self, mask: np.ndarray | None, z: int | None) -> None:
        """Draw a (Y, X) bool mask on slice z of the preview (2D: z None), or nothing; what was drawn goes."""
        if mask is None and self._preview_empty:  # as it is: no redraw (a slice change without prompts)
            return
        # Only the slice drawn last can hold a preview: clear it rather than the whole stack.
        drawn = self._preview_slice
        (self.preview.data if drawn is None else self.preview.data[drawn])[...] = 0
        self._preview_slice = z
        if mask is not None:
            (self.preview.data if z is None else self.preview.data[z])[mask] = PREVIEW_ID
        self._preview_empty = mask is None
        self.preview.refresh()

    def clear_preview(self) -> None:
        """Clear the whole preview, if there is one."""
        if self.preview is not None:
            self._preview_slice = None
            self.show_preview(None, None)

    def prompts(self, image: Image, z: int | None) -> SlicePrompts:
        """The prompts on slice z of `image` (None for a 2D image), in SAM's XY pixel coordinates."""
        live = [layer if self._live(layer) else None for layer in (self.points, self.boxes, self.brush)]
        points, boxes, brush = live
        return slice_prompts(points, boxes, image, z, brush)

    def add_point(self, position, positive: bool = True) -> None:
        """Add a click at `position` ((z, y, x) or (y, x) world coordinates), positive or negative."""
        self._style_new_points(POSITIVE if positive else NEGATIVE)
        self.points.add(np.asarray(self.points.world_to_data(np.asarray(position, dtype=float))))
        self._style_new_points(self.polarity)

    def toggle_polarity(self) -> int:
        """Make the next clicks negative if they were positive and the other way round; the new polarity."""
        self.polarity = NEGATIVE if self.polarity == POSITIVE else POSITIVE
        if self.points is not None:
            self._style_new_points(self.polarity)
        return self.polarity

    def add_box(self, corner, opposite) -> None:
        """Draw a box between two corners ((z, y, x) or (y, x) world coordinates, same z)."""
        to_data = self.boxes.world_to_data
        corner, opposite = (np.asarray(to_data(np.asarray(c, float))) for c in (corner, opposite))
        rectangle = np.array([corner, corner, opposite, opposite])
        rectangle[1, -1], rectangle[3, -1] = opposite[-1], corner[-1]
        self.boxes.add_rectangles(rectangle)

    def paint(self, mask, z: int | None = None) -> None:
        """Paint a (Y, X) bool mask on slice z of the brush layer (2D: z None)."""
        region = self.brush.data if z is None else self.brush.data[z]
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != region.shape:
            raise ValueError(f"The mask has shape {mask.shape}; the image's slices are {region.shape}.")
        region[mask] = 1
        self.brush.refresh()

    def clear(self, z: int | None) -> None:
        """Remove the clicks, boxes and painting of slice z (all of them for a 2D image, z None)."""
        for layer in (self.points, self.boxes):
            if layer is None or len(layer.data) == 0:
                continue
            keep = [i for i, item in enumerate(layer.data) if z is not None and round(np.asarray(item)[..., 0].min()) != z]
            layer.selected_data = set()  # indices into the old data
            with layer.events.data.blocker():
                if isinstance(layer.data, list):
                    layer.data = [layer.data[i] for i in keep]
                else:
                    layer.data = layer.data[keep]
        painted = None if self.brush is None else self.brush.data if z is None else self.brush.data[z]
        if painted is not None and painted.any():  # this slice only: a stack's brush may be large
            painted[...] = 0
            self.brush.refresh()

    def _style_new_points(self, polarity: int) -> None:
        """Label and colour of the next points, without recolouring the selected ones.

        napari applies a new current colour to the selected points too; a selected positive
        click would then look negative while staying positive. The selection is dropped first.
        """
        self.points.selected_data = set()
        self.points.feature_defaults["label"] = polarity
        self.points.current_face_color = POINT_COLORS[polarity]

    def _changed(self, event=None) -> None:
        if getattr(event, "action", None) in ("adding", "removing", "changing"):
            return  # the matching "added"/"removed"/"changed" event follows
        self._on_change()

    def _live(self, layer) -> bool:
        return layer is not None and layer in self._viewer.layers

    def _usable(self, layer, ndim: int) -> bool:
        return self._live(layer) and layer.ndim == ndim

    def _remove(self, layer) -> None:
        """Remove one of these layers to make it anew; let go of it first, so that its removal does not
        read as the user's (see `forget`)."""
        if layer is None:
            return
        self.forget(layer)
        if layer in self._viewer.layers:
            self._viewer.layers.remove(layer)


class _Prompts:
    """Copies of one image's clicks (with their labels and colours), boxes and painting."""

    def __init__(self, points=None, boxes=None, brush=None) -> None:
        self.points = points  # (data, features, face colours) or None
        self.boxes = boxes  # (data, shape types) or None
        self.brush = brush  # (shape, {slice index or None: painted slice}) or None
        clicks = 0 if points is None else len(points[0])
        self.count = clicks + (0 if boxes is None else len(boxes[0])) + (brush is not None)

    @classmethod
    def take(cls, layers: PromptLayers) -> _Prompts:
        """Copies of what `layers` hold now."""
        points = boxes = brush = None
        if layers._live(layers.points) and len(layers.points.data):
            layer = layers.points
            points = (layer.data.copy(), layer.features.copy(), layer.face_color.copy())
        if layers._live(layers.boxes) and len(layers.boxes.data):
            boxes = ([item.copy() for item in layers.boxes.data], list(layers.boxes.shape_type))
        if layers._live(layers.brush) and layers.brush.data.any():
            data = layers.brush.data
            if data.ndim == 2:
                painted = {None: np.array(data, copy=True)}
            else:  # the painted slices only: a stack's brush may be large
                painted = {z: np.array(data[z], copy=True) for z in range(len(data)) if data[z].any()}
            brush = (data.shape, painted)
        return cls(points, boxes, brush)

    def restore(self, layers: PromptLayers) -> bool:
        """Put the copies back into `layers` where they fit; whether all of them went back."""
        done = True
        if self.points is not None:
            layer = layers.points
            if layers._live(layer) and layer.ndim == self.points[0].shape[1]:
                with layer.events.data.blocker():
                    layer.data = self.points[0]
                layer.features = self.points[1]
                layer.face_color = self.points[2]
                self.points = None
            else:
                done = False
        if self.boxes is not None:
            layer = layers.boxes
            if layers._live(layer) and layer.ndim == self.boxes[0][0].shape[1]:
                with layer.events.data.blocker():
                    layer.add(self.boxes[0], shape_type=self.boxes[1])
                self.boxes = None
            else:
                done = False
        if self.brush is not None:
            layer = layers.brush
            shape, painted = self.brush
            if layers._live(layer) and layer.data.shape == shape:
                for z, values in painted.items():
                    (layer.data if z is None else layer.data[z])[...] = values
                layer.refresh()
                self.brush = None
            else:
                done = False
        return done


def placement(image: Image) -> dict:
    """`image`'s world placement (scale, offset, rotation, shear, affine), as keywords for napari's
    ``add_labels`` / ``add_points`` / ``add_shapes``.

    A layer is made already placed: added at scale 1 first, it would change the world's extent until
    aligned, and napari would move the slider to another slice meanwhile.
    """
    return {
        "scale": image.scale, "translate": image.translate, "rotate": image.rotate, "shear": image.shear,
        "affine": image.affine.affine_matrix,
    }


def align_with(layer: Layer, image: Image) -> None:
    """Give `layer` the world placement of `image` (same spatial axes): scale, offset, rotation, shear.

    Only what differs is set: napari redraws a layer for each placement set, even an unchanged one,
    which on a large image takes a good part of a second per layer.
    """
    for name in ("scale", "translate", "rotate", "shear"):
        if not np.array_equal(getattr(layer, name), getattr(image, name)):
            setattr(layer, name, getattr(image, name))
    if not np.array_equal(layer.affine.affine_matrix, image.affine.affine_matrix):
        layer.affine = image.affine.affine_matrix
