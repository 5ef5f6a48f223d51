"""The registry of named model weights that can be downloaded by name.

Every entry records where a weight file lives, the hash it must have, and
which architecture (a key of ``samcore.build.ARCHITECTURES``) it is for.
Hashes are written ``"<algorithm>:<hex digest>"``; ``sha256`` and ``xxh128``
are used here (``xxh128`` needs the ``xxhash`` package).

Sources of the URLs and hashes:

* ``vit_b``, ``vit_l``, ``vit_h``: the download links in the README of
  facebookresearch/segment-anything; SHA-256 digests as listed in the
  micro-sam model registry (``micro_sam/util.py``, releases before 1.0) and
  by many independent projects pinning the same files.
* ``vit_t``: MobileSAM's ``weights/mobile_sam.pt`` (GitHub repository
  ChaoningZhang/MobileSAM); SHA-256 as in the micro-sam registry.
* ``*_lm`` and ``*_em_organelles``: the micro-sam model registry
  (``micro_sam/v1/util.py``), BioImage.IO model files with xxh128 digests.

This module deliberately imports nothing heavy (no torch), so listing models
stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

# Automatic segmentation's (predicted IoU, stability) thresholds for weights without their own: those of
# segment-anything's automatic mask generator.
SAM_THRESHOLDS = (0.88, 0.95)

#: The name used when no model is named at all.
DEFAULT_MODEL_NAME = "default"

#: How many views of an image (itself, then mirror images) a predictor can average.
VIEWS = (1, 2, 4)


@dataclass(frozen=True)
class ModelEntry:
    """One downloadable set of SAM weights.

    Attributes:
        name: The name users type, e.g. ``"vit_b_lm"``.
        architecture: The architecture the weights are for (a key of
            ``samcore.build.ARCHITECTURES``).
        url: Where the file is downloaded from.
        hash: ``"<algorithm>:<hex digest>"`` of the file, e.g.
            ``"sha256:ec2d..."`` or ``"xxh128:fe92..."``.
        filename: The file name in the local cache folder.
        description: One sentence on what the model is good for.
        source: Who publishes the weights (and where).
        licence: The licence of the weights.
        packaged: The file ships inside the package (folder ``samcore/weights``) instead of
            being downloaded; ``url`` is then empty.
        auto_thresholds: ``(min_predicted_iou, min_stability)`` for automatic segmentation, for
            weights whose predicted IoUs run lower than SAM's; None keeps SAM's (0.88, 0.95).
        refine: Interactive prompts decode twice by default, the second time with the first
            pass's logits as mask input (``samcore.Predictor``'s ``refine``), for weights that
            were measured to gain from it.
        views: How many views of an image predictors average by default (one of ``VIEWS``;
            ``samcore.Predictor``'s ``views``).
        zoom: Boxes around small objects are decoded on the crop around them by default
            (``samcore.Predictor``'s ``zoom``, see ``samcore.zoom``).
        max_enlargement: A small image is enlarged at most this many times to the model's input, the
            rest of the input being padding (``samcore.transforms.model_input_size``). None scales
            every image's longest side to the input size, as SAM does.
    """

    name: str
    architecture: str
    url: str
    hash: str
    filename: str
    description: str
    source: str
    licence: str
    packaged: bool = False
    auto_thresholds: tuple[float, float] | None = None
    refine: bool = False
    views: int = 1
    zoom: bool = False
    max_enlargement: float | None = None

    @property
    def hash_algorithm(self) -> str:
        """The hash algorithm, e.g. ``"sha256"`` or ``"xxh128"``."""
        return self.hash.partition(":")[0].lower()

    @property
    def hash_digest(self) -> str:
        """The expected hex digest, lower case, without the algorithm prefix."""
        return self.hash.partition(":")[2].lower()


class ModelNotIncludedError(LookupError):
    """A known model name whose weights are not available in this version."""


_META = "Meta AI (github.com/facebookresearch/segment-anything)"
_META_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"
_MOBILE_SAM = "MobileSAM, Zhang et al. (github.com/ChaoningZhang/MobileSAM)"
_MICRO_SAM = "micro-sam, Archit et al. 2025 (github.com/computational-cell-analytics/micro-sam), BioImage.IO"
_BIOIMAGEIO = "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/"

_ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry(
        name="vit_b",
        architecture="vit_b",
        url=_META_BASE + "sam_vit_b_01ec64.pth",
        hash="sha256:ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        filename="sam_vit_b_01ec64.pth",
        description="Original Segment Anything, ViT-Base encoder (375 MB); trained on natural images.",
        source=_META,
        licence="Apache-2.0",
    ),
    ModelEntry(
        name="vit_l",
        architecture="vit_l",
        url=_META_BASE + "sam_vit_l_0b3195.pth",
        hash="sha256:3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        filename="sam_vit_l_0b3195.pth",
        description="Original Segment Anything, ViT-Large encoder (1.2 GB); trained on natural images.",
        source=_META,
        licence="Apache-2.0",
    ),
    ModelEntry(
        name="vit_h",
        architecture="vit_h",
        url=_META_BASE + "sam_vit_h_4b8939.pth",
        hash="sha256:a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        filename="sam_vit_h_4b8939.pth",
        description="Original Segment Anything, ViT-Huge encoder (2.6 GB); trained on natural images.",
        source=_META,
        licence="Apache-2.0",
    ),
    ModelEntry(
        name="vit_t",
        architecture="vit_t",
        url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        hash="sha256:6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        filename="mobile_sam.pt",
        description="MobileSAM, small TinyViT encoder (40 MB); fast on a CPU, trained on natural images.",
        source=_MOBILE_SAM,
        licence="Apache-2.0",
    ),
    ModelEntry(
        name="vit_b_lm",
        architecture="vit_b",
        url=_BIOIMAGEIO + "diplomatic-bug/1.2/files/vit_b.pt",
        hash="xxh128:fe9252a29f3f4ea53c15a06de471e186",
        filename="micro_sam_vit_b_lm_v1.2.pt",
        description="micro-sam light microscopy generalist (cells and nuclei), ViT-Base encoder.",
        source=_MICRO_SAM,
        licence="CC-BY-4.0",
    ),
    ModelEntry(
        name="vit_l_lm",
        architecture="vit_l",
        url=_BIOIMAGEIO + "idealistic-rat/1.2/files/vit_l.pt",
        hash="xxh128:017f20677997d628426dec80a8018f9d",
        filename="micro_sam_vit_l_lm_v1.2.pt",
        description="micro-sam light microscopy generalist (cells and nuclei), ViT-Large encoder.",
        source=_MICRO_SAM,
        licence="CC-BY-4.0",
    ),
    ModelEntry(
        name="vit_t_lm",
        architecture="vit_t",
        url=_BIOIMAGEIO + "faithful-chicken/1.1/files/vit_t.pt",
        hash="xxh128:72ec5074774761a6e5c05a08942f981e",
        filename="micro_sam_vit_t_lm_v1.1.pt",
        description="micro-sam light microscopy generalist (cells and nuclei), small TinyViT encoder.",
        source=_MICRO_SAM,
        licence="CC-BY-4.0",
    ),
    ModelEntry(
        name="vit_b_em_organelles",
        architecture="vit_b",
        url=_BIOIMAGEIO + "noisy-ox/1.2/files/vit_b.pt",
        hash="xxh128:f3bf2ed83d691456bae2c3f9a05fb438",
        filename="micro_sam_vit_b_em_organelles_v1.2.pt",
        description="micro-sam electron microscopy model for mitochondria and nuclei, ViT-Base encoder.",
        source=_MICRO_SAM,
        licence="CC-BY-4.0",
    ),
    ModelEntry(
        name="vit_l_em_organelles",
        architecture="vit_l",
        url=_BIOIMAGEIO + "humorous-crab/1.2/files/vit_l.pt",
        hash="xxh128:810b084b6e51acdbf760a993d8619f2d",
        filename="micro_sam_vit_l_em_organelles_v1.2.pt",
        description="micro-sam electron microscopy model for mitochondria and nuclei, ViT-Large encoder.",
        source=_MICRO_SAM,
        licence="CC-BY-4.0",
    ),
    ModelEntry(
        name="vit_t_em_organelles",
        architecture="vit_t",
        url=_BIOIMAGEIO + "greedy-whale/1/files/vit_t.pt",
        hash="xxh128:253474720c497cce605e57c9b1d18fd9",
        filename="micro_sam_vit_t_em_organelles_v1.pt",
        description="micro-sam electron microscopy model for mitochondria and nuclei, small TinyViT encoder.",
        source=_MICRO_SAM,
        licence="CC-BY-4.0",
    ),
)

#: The project's own model, used when no name is given: shipped inside the package,
#: trained on generated scenes only (``python -m samcore.training``; its training notes are
#: ``samcore/weights/micro_v1.json``). Replace the file and the hash together.
BUNDLED_MODEL: ModelEntry | None = ModelEntry(
    name=DEFAULT_MODEL_NAME,
    architecture="micro_v1",
    url="",
    hash="sha256:794053902a319aa4e8084d58131625caa166f84517a95f574ce6f6fba04a7770",
    filename="micro_v1.pt",
    description="napari-sam's own small model (12 MB): offline and fast on a CPU; trained on generated scenes only.",
    source="napari-sam (python -m samcore.training --seed 0)",
    licence="BSD-3-Clause",
    packaged=True,
    auto_thresholds=(0.4, 0.8),
    # On generated validation scenes (not the training ones), a second pass raised the mean IoU
    # of one click from 0.728 to 0.750 and of a box from 0.823 to 0.826 (768 objects each).
    refine=True,
    # On 48 other generated validation scenes (384 objects, a box or the most interior pixel
    # each), averaging with the mirror image raised a box from 0.756 to 0.811 and a refined
    # click from 0.701 to 0.764; 4 views gave 0.817 and 0.756 (one pass) for twice the time.
    views=2,
    # On 24 generated scenes each of three more seeds (185 to 192 boxes), decoding small boxes on
    # the crop around them raised a box from 0.791 to 0.868, 0.813 to 0.875 and 0.844 to 0.894 (one
    # view, crops of 8, 8 and 6 box sides); nearly all the gain is on objects under 400 pixels.
    zoom=True,
    # Generated scenes of 64 and 128 px (12 each per size, all families; seed 888001 to choose among
    # at most 1, 2, 3 and 4 times and none, 888002 to check): enlarged to the 512 px input (8 and 4
    # times), a box scored 0.646 and 0.707 mean IoU, at most twice 0.809 and 0.762; a click 0.559 and
    # 0.608 against 0.744 and 0.686. Images of 256 px and more are as before.
    max_enlargement=2.0,
)

#: Names people may know from micro-sam whose weights micro-sam does not
#: publish (any more), mapped to their architecture. They can still be used
#: with a local file, e.g. ``load_model("vit_h_lm", checkpoint="my_file.pt")``.
UNPUBLISHED: dict[str, str] = {
    "vit_h_lm": "vit_h",
    "vit_h_em_organelles": "vit_h",
}

MODELS: dict[str, ModelEntry] = {entry.name: entry for entry in _ENTRIES}


def model_names() -> list[str]:
    """Return the names that can be downloaded, the default model first if it exists.

    Returns:
        Model names accepted by ``get_entry``.
    """
    names = list(MODELS)
    if BUNDLED_MODEL is not None:
        names.insert(0, DEFAULT_MODEL_NAME)
    return names


def available_entries() -> list[ModelEntry]:
    """Return every downloadable entry, the default model first if it exists.

    Returns:
        The entries in display order.
    """
    return [get_entry(name) for name in model_names()]


def get_entry(name: str | None = None) -> ModelEntry:
    """Look up a model by name.

    Args:
        name: A model name; ``None`` means the default model.

    Returns:
        The registry entry.

    Raises:
        ModelNotIncludedError: The name is known but its weights are not
            available (the bundled default model, or an unpublished one).
        ValueError: The name is unknown; the message lists the valid names.
        TypeError: ``name`` is not a string.
    """
    if name is None:
        name = DEFAULT_MODEL_NAME
    if not isinstance(name, str):
        raise TypeError(f"The model name must be text, e.g. 'vit_b_lm', not {type(name).__name__}.")
    if name == DEFAULT_MODEL_NAME:
        if BUNDLED_MODEL is None:
            raise ModelNotIncludedError(_bundled_missing_message())
        return BUNDLED_MODEL
    if name in MODELS:
        return MODELS[name]
    if name in UNPUBLISHED:
        raise ModelNotIncludedError(_unpublished_message(name))
    raise ValueError(f"Unknown model name {name!r}. Valid names: {', '.join(model_names())}.")


def _bundled_missing_message() -> str:
    return (
        "The bundled napari-sam model is not included in this version yet. "
        "Choose one of the available models by name, for example "
        "load_model('vit_b_lm') for light microscopy, load_model('vit_b_em_organelles') "
        "for electron microscopy or load_model('vit_b') for the original SAM, "
        "or load your own weight file with load_model(checkpoint='path/to/weights.pt'). "
        f"Available names: {', '.join(model_names())}."
    )


def _unpublished_message(name: str) -> str:
    return (
        f"micro-sam does not publish weights for {name!r}, so it cannot be downloaded. "
        f"If you have such a file, load it with load_model({name!r}, checkpoint='path/to/file.pt'); "
        f"otherwise choose one of: {', '.join(model_names())}."
    )
