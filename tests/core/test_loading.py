"""Loading SAM weights from files of every supported layout, and the errors for bad files.

All weight files are written by the tests themselves; nothing touches the network.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from samcore import checkpoint, device, download, zoo
from samcore.build import ARCHITECTURES, build_sam
from samcore.checkpoint import ArchitectureMismatchError, CheckpointError, load_checkpoint
from samcore.device import select_device
from samcore.loading import list_models, load_model


pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture(scope="module")
def test_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {key: value.clone() for key, value in build_sam("vit_test").state_dict().items()}


@pytest.fixture
def plain_file(tmp_path: Path, test_state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "vit_test.pth"
    torch.save(test_state, path)
    return path


def assert_same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key].cpu(), value), key


# --- round trips -----------------------------------------------------------------------------


def test_plain_state_dict_round_trip(plain_file: Path, test_state: dict[str, torch.Tensor]) -> None:
    model = load_model(checkpoint=plain_file, device="cpu")
    assert_same_weights(model, test_state)
    assert model.architecture == "vit_test"
    assert not model.training
    assert next(model.parameters()).device.type == "cpu"


def test_torch_em_checkpoint_round_trip(tmp_path: Path, test_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "best.pt"
    torch.save(
        {
            "model_state": {"sam." + key: value for key, value in test_state.items()},
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5}]},
            "decoder_state": {"head.weight": torch.zeros(2, 2)},
            "config": {"n_objects_per_batch": 25},
            "init_epoch": 7,
        },
        path,
    )
    model = load_model(checkpoint=path, device="cpu")
    assert_same_weights(model, test_state)


@pytest.mark.parametrize("layout", ["state_dict", "model", "module_prefix"])
def test_other_wrappers_round_trip(layout: str, tmp_path: Path, test_state: dict[str, torch.Tensor]) -> None:
    if layout == "module_prefix":
        content = {"module." + key: value for key, value in test_state.items()}
    else:
        content = {layout: dict(test_state), "epoch": 3}
    path = tmp_path / f"{layout}.pt"
    torch.save(content, path)
    assert_same_weights(load_model(checkpoint=path, device="cpu"), test_state)


def test_legacy_serialisation_round_trip(tmp_path: Path, test_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "legacy.pth"
    torch.save(test_state, path, _use_new_zipfile_serialization=False)
    assert_same_weights(load_model(checkpoint=path, device="cpu"), test_state)


def test_mobile_sam_layout_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    state = {key: value.clone() for key, value in build_sam("vit_t").state_dict().items()}
    path = tmp_path / "mobile_sam.pt"
    torch.save(state, path)
    model = load_model(checkpoint=path, device="cpu")
    assert model.architecture == "vit_t"
    assert_same_weights(model, state)


def test_checkpoint_with_pickled_objects_only_opens_when_chosen(
    tmp_path: Path, test_state: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A training checkpoint that stores an object of a package that is not installed here.
    fake = types.ModuleType("fake_trainer_pkg")

    class TrainerConfig:
        def __init__(self) -> None:
            self.learning_rate = 1e-5

    TrainerConfig.__module__ = fake.__name__
    TrainerConfig.__qualname__ = "TrainerConfig"
    fake.TrainerConfig = TrainerConfig
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    path = tmp_path / "with_objects.pt"
    torch.save(
        {"model_state": {"sam." + k: v for k, v in test_state.items()}, "config": TrainerConfig()}, path
    )
    monkeypatch.delitem(sys.modules, fake.__name__)

    with pytest.raises(CheckpointError, match="other Python objects") as caught:
        load_checkpoint(path, trusted=False)
    assert str(path) in str(caught.value)
    # Chosen explicitly by the user: read fully, the unknown class replaced by a placeholder.
    assert_same_weights(load_model(checkpoint=path, device="cpu"), test_state)


def test_half_precision_file_is_loaded_as_float32(
    tmp_path: Path, test_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "half.pt"
    torch.save({key: value.half() for key, value in test_state.items()}, path)
    model = load_model(checkpoint=path, device="cpu")
    assert next(model.parameters()).dtype == torch.float32


# --- names and architectures -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit_test", None])
def test_matching_or_no_name_is_accepted(name: str | None, plain_file: Path) -> None:
    assert load_model(name, checkpoint=plain_file, device="cpu").architecture == "vit_test"


@pytest.mark.parametrize(
    ("name", "architecture"), [("vit_b", "vit_b"), ("vit_l_lm", "vit_l"), ("vit_h_lm", "vit_h")]
)
def test_name_that_does_not_match_file_is_refused(name: str, architecture: str, plain_file: Path) -> None:
    with pytest.raises(ArchitectureMismatchError) as caught:
        load_model(name, checkpoint=plain_file, device="cpu")
    message = str(caught.value)
    assert "vit_test" in message and architecture in message and str(plain_file) in message
    assert caught.value.found == "vit_test" and caught.value.requested == architecture


def test_unknown_name_lists_valid_names(plain_file: Path) -> None:
    with pytest.raises(ValueError, match="vit_b_lm") as caught:
        load_model("vit_q")
    assert "vit_q" in str(caught.value)
    with pytest.raises(ValueError, match="Valid names"):
        load_model("vit_q", checkpoint=plain_file)


def test_no_name_and_default_give_the_bundled_model_offline(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path / "empty cache"))  # nothing cached, no download
    for model in (load_model(device="cpu"), load_model("default", device="cpu")):
        assert model.architecture == zoo.BUNDLED_MODEL.architecture
    assert not (tmp_path / "empty cache").exists() or not any((tmp_path / "empty cache").iterdir())


def test_unpublished_name_explains_itself() -> None:
    with pytest.raises(zoo.ModelNotIncludedError, match="does not publish"):
        load_model("vit_h_lm")


# --- bad files ---------------------------------------------------------------------------------


def _expect_checkpoint_error(path: Path, pattern: str, name: str | None = None) -> None:
    with pytest.raises(CheckpointError, match=pattern) as caught:
        load_model(name, checkpoint=path, device="cpu")
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_model(checkpoint=path)


def test_folder_instead_of_file(tmp_path: Path) -> None:
    _expect_checkpoint_error(tmp_path, "folder")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    _expect_checkpoint_error(path, "empty")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(legacy: bool, plain_file: Path, tmp_path: Path, test_state: dict) -> None:
    if legacy:
        torch.save(test_state, plain_file, _use_new_zipfile_serialization=False)
    data = plain_file.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    _expect_checkpoint_error(path, "incomplete|damaged")


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(os.urandom(4096))
    _expect_checkpoint_error(path, "not a PyTorch|damaged")


def test_not_a_sam_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(4)}, path)
    _expect_checkpoint_error(path, "not a Segment Anything checkpoint")


@pytest.mark.parametrize("name", [None, "vit_test"])
def test_missing_key(name: str | None, tmp_path: Path, test_state: dict[str, torch.Tensor]) -> None:
    state = dict(test_state)
    del state["mask_decoder.iou_token.weight"]
    path = tmp_path / "missing.pt"
    torch.save(state, path)
    _expect_checkpoint_error(path, r"1 missing weight\(s\): mask_decoder.iou_token.weight", name)


def test_unexpected_key(tmp_path: Path, test_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "extra.pt"
    torch.save({**test_state, "mask_decoder.extra_head.weight": torch.zeros(3)}, path)
    _expect_checkpoint_error(path, r"unexpected weight\(s\): mask_decoder.extra_head.weight")


def test_wrong_shape(tmp_path: Path, test_state: dict[str, torch.Tensor]) -> None:
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    state = {**test_state, key: torch.zeros(3, 5)}
    path = tmp_path / "shape.pt"
    torch.save(state, path)
    expected = re.escape(f"wrong shape: {key} (file (3, 5), model {tuple(test_state[key].shape)})")
    _expect_checkpoint_error(path, expected)


def test_errors_are_value_errors() -> None:
    assert issubclass(CheckpointError, ValueError)
    assert issubclass(ArchitectureMismatchError, CheckpointError)


# --- the zoo ---------------------------------------------------------------------------------


def test_zoo_entries_are_consistent() -> None:
    expected_names = {
        "vit_b", "vit_l", "vit_h", "vit_t",
        "vit_b_lm", "vit_l_lm", "vit_t_lm",
        "vit_b_em_organelles", "vit_l_em_organelles", "vit_t_em_organelles",
    }  # fmt: skip
    assert set(zoo.MODELS) == expected_names
    assert len({entry.filename for entry in zoo.MODELS.values()}) == len(zoo.MODELS)
    digest_lengths = {"sha256": 64, "xxh128": 32}
    for name, entry in zoo.MODELS.items():
        assert entry.name == name
        assert entry.architecture in ARCHITECTURES
        assert entry.url.startswith("https://")
        assert len(entry.hash_digest) == digest_lengths[entry.hash_algorithm]
        int(entry.hash_digest, 16)
        assert entry.description and entry.source and entry.licence
    for architecture in zoo.UNPUBLISHED.values():
        assert architecture in ARCHITECTURES


def test_zoo_module_does_not_import_torch() -> None:
    tree = ast.parse(inspect.getsource(zoo))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    } | {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "torch" not in imported


def test_list_models_reports_cache(tmp_path: Path) -> None:
    statuses = {status.entry.name: status for status in list_models()}
    assert list(statuses)[0] == zoo.DEFAULT_MODEL_NAME and set(statuses) == {zoo.DEFAULT_MODEL_NAME, *zoo.MODELS}
    # The bundled model ships in the package; nothing else is on disk yet.
    assert {name for name, status in statuses.items() if status.cached} == {zoo.DEFAULT_MODEL_NAME}
    cached = statuses["vit_t"].path
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert {status.entry.name for status in list_models() if status.cached} == {zoo.DEFAULT_MODEL_NAME, "vit_t"}
    assert cached.parent == tmp_path / "cache"


def test_zoo_entry_without_network_names_url_and_destination() -> None:
    entry = zoo.MODELS["vit_b_lm"]
    with pytest.raises(download.WeightsUnavailableError) as caught:
        load_model("vit_b_lm", device="cpu")
    message = str(caught.value)
    assert entry.url in message
    assert str(download.cached_path(entry)) in message


# --- devices ---------------------------------------------------------------------------------


def test_auto_device_is_cpu_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "mps_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    assert select_device() == torch.device("cpu")


def test_auto_device_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "mps_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto").type == "mps"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_clear_error(plain_file: Path) -> None:
    with pytest.raises(ValueError, match="No NVIDIA GPU") as caught:
        select_device("cuda")
    assert "device='cpu'" in str(caught.value) and "device='auto'" in str(caught.value)
    with pytest.raises(ValueError, match="No NVIDIA GPU"):
        load_model(checkpoint=plain_file, device="cuda")


@pytest.mark.skipif(device.mps_available(), reason="an Apple GPU is present")
def test_mps_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="No Apple GPU"):
        select_device("mps")


def test_explicit_cpu_and_bad_devices() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")
    with pytest.raises(ValueError, match="Unknown device"):
        select_device("banana")
    with pytest.raises(ValueError, match="Unsupported device"):
        select_device("meta")
    with pytest.raises(TypeError):
        select_device(0)  # type: ignore[arg-type]


def test_checkpoint_module_reads_only_tensors() -> None:
    state = checkpoint.normalise_state_dict(
        {"model_state": {"sam.image_encoder.pos_embed": torch.zeros(1), "sam.step": 3}}, "x.pt"
    )
    assert list(state) == ["image_encoder.pos_embed"]


# --- defaults that come with a weight file -------------------------------------------------------


def test_a_file_of_sams_architecture_decodes_as_segment_anything(plain_file: Path) -> None:
    model = load_model(checkpoint=plain_file, device="cpu")
    assert not getattr(model, "auto_defaults", {})
    assert (getattr(model, "refine_masks", False), getattr(model, "views", 1)) == (False, 1)
    assert not getattr(model, "zoom_boxes", False)


def test_a_model_trained_here_decodes_as_the_bundled_one_with_its_thresholds(tmp_path: Path) -> None:
    bundled = zoo.BUNDLED_MODEL
    torch.manual_seed(0)
    path = tmp_path / "micro_v1.pt"
    torch.save(build_sam(bundled.architecture).state_dict(), path)
    model = load_model(checkpoint=path, device="cpu")  # no training notes beside it: the bundled model's
    decoding = (model.refine_masks, model.views, model.zoom_boxes)
    assert decoding == (bundled.refine, bundled.views, bundled.zoom)
    assert tuple(model.auto_defaults.values()) == bundled.auto_thresholds
    notes = path.with_suffix(".json")
    notes.write_text('{"steps": 10, "auto_thresholds": [0.25, 0.7]}')  # as calibrate writes
    assert tuple(load_model(checkpoint=path, device="cpu").auto_defaults.values()) == (0.25, 0.7)
    notes.write_text("not json")
    assert tuple(load_model(checkpoint=path, device="cpu").auto_defaults.values()) == bundled.auto_thresholds


def test_sam_model_registry_builds_and_loads_as_segment_anything_does(tmp_path):
    from segment_anything import sam_model_registry as official_registry

    from samcore import sam_model_registry

    assert set(sam_model_registry) == {"default", "vit_h", "vit_l", "vit_b", "vit_t"}
    assert sam_model_registry["default"].architecture == "vit_h"  # as in segment-anything
    torch.manual_seed(0)
    official = official_registry["vit_b"]()
    ours = sam_model_registry["vit_b"]()
    assert not ours.training
    theirs = {k: v.shape for k, v in official.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    path = tmp_path / "sam_vit_b.pth"
    torch.save(official.state_dict(), path)
    loaded = sam_model_registry["vit_b"](checkpoint=path)
    assert loaded.architecture == "vit_b" and next(loaded.parameters()).device.type == "cpu"
    for key, value in official.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="vit_l"):  # a file of another architecture is refused by name
        sam_model_registry["vit_l"](checkpoint=path)
