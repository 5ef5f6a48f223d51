"""Downloading into the cache: hashes, the sidecar record, atomic placement, and offline errors.

Downloads use local ``file://`` URLs or a replaced URL opener; nothing touches the network.
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch

from samcore import download, zoo
from samcore.build import build_sam
from samcore.download import HashMismatchError, WeightsUnavailableError, fetch
from samcore.loading import load_model
from samcore.progress import run
from samcore.zoo import ModelEntry

PAYLOAD = b"pretend these are model weights " * 1000


pytestmark = pytest.mark.usefixtures("cache")


def make_entry(
    tmp_path: Path, payload: bytes = PAYLOAD, algorithm: str = "sha256", name: str = "demo"
) -> ModelEntry:
    source = tmp_path / "server" / f"{name}.bin"
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(payload)
    return ModelEntry(
        name=name,
        architecture="vit_test",
        url=source.as_uri(),
        hash=f"{algorithm}:{download.file_hash(source, algorithm)}",
        filename=f"{name}_weights.pt",
        description="test weights",
        source="tests",
        licence="none",
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".part", ".tmp")))


def test_cache_dir_follows_environment(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert download.cache_dir() == cache
    monkeypatch.delenv(download.CACHE_ENV_VAR)
    assert download.cache_dir().name == "napari-sam"


@pytest.mark.parametrize("algorithm", ["sha256", "xxh128"])
def test_fetch_downloads_and_checks_hash(algorithm: str, tmp_path: Path, cache: Path) -> None:
    if algorithm == "xxh128":
        pytest.importorskip("xxhash")
    entry = make_entry(tmp_path, algorithm=algorithm)
    path = fetch(entry, progress=False)
    assert path == cache / entry.filename
    assert path.read_bytes() == PAYLOAD
    assert (cache / (entry.filename + ".verified.json")).is_file()
    assert leftovers(cache) == []


def test_xxh128_matches_reference_digest() -> None:
    xxhash = pytest.importorskip("xxhash")
    assert download._new_hasher("xxh128").name == xxhash.xxh3_128().name
    hasher = download._new_hasher("xxh128")
    hasher.update(b"")
    # XXH3-128 of empty input, as printed by `xxh128sum` for an empty file.
    assert hasher.hexdigest() == "99aa06d3014798d86001c324468d497f"


def test_cached_file_is_used_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = make_entry(tmp_path)
    fetch(entry, progress=False)
    monkeypatch.setattr(download, "_open_url", _no_network)
    assert fetch(entry, progress=False).read_bytes() == PAYLOAD


def test_sidecar_avoids_hashing_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = make_entry(tmp_path)
    path = fetch(entry, progress=False)
    calls = []
    real_hash = download.file_hash
    monkeypatch.setattr(download, "file_hash", lambda *args: calls.append(args) or real_hash(*args))
    fetch(entry, progress=False)
    assert calls == []
    # A changed modification time means the file must be checked again.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    fetch(entry, progress=False)
    assert len(calls) == 1
    fetch(entry, progress=False)
    assert len(calls) == 1


def test_file_placed_by_hand_is_checked_and_accepted(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = make_entry(tmp_path)
    monkeypatch.setattr(download, "_open_url", _no_network)
    cache.mkdir()
    (cache / entry.filename).write_bytes(PAYLOAD)
    assert fetch(entry, progress=False) == cache / entry.filename


def test_download_with_wrong_hash_is_refused(tmp_path: Path, cache: Path) -> None:
    entry = make_entry(tmp_path)
    wrong = ModelEntry(**{**entry.__dict__, "hash": "sha256:" + "0" * 64})
    with pytest.raises(HashMismatchError) as caught:
        fetch(wrong, progress=False)
    message = str(caught.value)
    actual = hashlib.sha256(PAYLOAD).hexdigest()
    assert wrong.hash in message and actual in message and wrong.url in message
    assert caught.value.actual == "sha256:" + actual
    assert not (cache / entry.filename).exists()
    assert leftovers(cache) == []


def test_corrupt_cached_file_is_refused_and_moved_aside(tmp_path: Path, cache: Path) -> None:
    entry = make_entry(tmp_path)
    path = fetch(entry, progress=False)
    path.write_bytes(PAYLOAD[:-10] + b"corrupted!")
    with pytest.raises(HashMismatchError) as caught:
        fetch(entry, progress=False)
    message = str(caught.value)
    assert str(path) in message and entry.hash in message
    assert not path.exists()
    assert (cache / (entry.filename + ".rejected")).exists()
    # The next call downloads a good copy again.
    assert fetch(entry, progress=False).read_bytes() == PAYLOAD


def _no_network(request: urllib.request.Request, *args: Any, **kwargs: Any) -> NoReturn:
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_no_network_gives_one_clear_error(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = make_entry(tmp_path)
    monkeypatch.setattr(download, "_open_url", _no_network)
    with pytest.raises(WeightsUnavailableError) as caught:
        fetch(entry, progress=False)
    message = str(caught.value)
    destination = cache / entry.filename
    assert entry.url in message and str(destination) in message
    assert caught.value.url == entry.url and caught.value.destination == destination
    assert isinstance(caught.value, RuntimeError)
    assert not destination.exists() and leftovers(cache) == []


def test_real_entry_offline_names_real_url_and_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_open_url", _no_network)
    entry = zoo.MODELS["vit_b"]
    with pytest.raises(WeightsUnavailableError) as caught:
        fetch(entry, progress=False)
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in str(caught.value)
    assert str(download.cached_path(entry)) in str(caught.value)


def test_http_error_is_reported_as_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = make_entry(tmp_path)

    def not_found(request: urllib.request.Request, *args: Any, **kwargs: Any) -> NoReturn:
        raise urllib.error.HTTPError(request.full_url, 404, "Not Found", {}, io.BytesIO())

    monkeypatch.setattr(download, "_open_url", not_found)
    with pytest.raises(WeightsUnavailableError, match="404"):
        fetch(entry, progress=False)


def test_fetch_job_reports_bytes_and_closing_it_leaves_nothing(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = make_entry(tmp_path)
    monkeypatch.setattr(download, "_DOWNLOAD_CHUNK", 4096)
    job = download.fetch_job(entry, progress=False)
    first, second = next(job), next(job)
    assert (first.stage, first.done, first.total) == ("download", 4096, len(PAYLOAD))
    assert second.done == 8192
    assert len(leftovers(cache)) == 1  # the partial file, while it downloads
    job.close()  # the user stops it
    assert not (cache / entry.filename).exists() and leftovers(cache) == []
    steps = []
    path = run(download.fetch_job(entry, progress=False), steps.append)
    assert path.read_bytes() == PAYLOAD
    assert [step.done for step in steps] == [min(4096 * k, len(PAYLOAD)) for k in range(1, len(steps) + 1)]
    assert steps[-1].done == len(PAYLOAD)
    assert list(download.fetch_job(entry, progress=False)) == []  # cached: nothing to report


def test_connection_lost_mid_download(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = make_entry(tmp_path)

    class Dropping(io.BytesIO):
        headers = {"Content-Length": str(len(PAYLOAD))}

        def read(self, size: int = -1) -> bytes:
            raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(download, "_open_url", lambda request, **kwargs: Dropping())
    with pytest.raises(WeightsUnavailableError, match="connection reset"):
        fetch(entry, progress=False)
    assert not (cache / entry.filename).exists() and leftovers(cache) == []


def test_load_model_by_name_downloads_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    state = build_sam("vit_test").state_dict()
    weights = tmp_path / "weights.pth"
    torch.save(state, weights)
    entry = make_entry(tmp_path, payload=weights.read_bytes(), name="tiny_demo")
    monkeypatch.setitem(zoo.MODELS, "tiny_demo", entry)
    model = load_model("tiny_demo", device="cpu")
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    # The bundled default model is one assignment away.
    monkeypatch.setattr(
        zoo, "BUNDLED_MODEL", ModelEntry(**{**entry.__dict__, "name": zoo.DEFAULT_MODEL_NAME})
    )
    assert load_model(device="cpu").architecture == "vit_test"


def packaged_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ModelEntry, Path]:
    folder = tmp_path / "site-packages" / "samcore" / "weights"
    folder.mkdir(parents=True)
    (folder / "shipped.pt").write_bytes(PAYLOAD)
    monkeypatch.setattr(download, "packaged_path", lambda filename: folder / filename)
    entry = ModelEntry(
        name="shipped", architecture="vit_test", url="", hash=f"sha256:{hashlib.sha256(PAYLOAD).hexdigest()}",
        filename="shipped.pt", description="test weights", source="tests", licence="none", packaged=True,
    )
    return entry, folder / "shipped.pt"


def test_packaged_weights_are_checked_and_used_in_place(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, shipped = packaged_entry(tmp_path, monkeypatch)
    assert download.is_cached(entry)
    assert fetch(entry) == shipped
    assert not cache.exists() or not any(cache.iterdir())  # nothing copied or downloaded


def test_damaged_packaged_weights_ask_for_a_reinstall_and_stay_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, shipped = packaged_entry(tmp_path, monkeypatch)
    shipped.write_bytes(PAYLOAD[:-10])
    with pytest.raises(HashMismatchError, match="Reinstall napari-sam"):
        fetch(entry)
    assert shipped.is_file()
    shipped.unlink()
    with pytest.raises(WeightsUnavailableError, match="missing"):
        fetch(entry)
