"""Download model weights into a local cache folder and check their hashes.

The cache folder is ``$NAPARI_SAM_CACHE`` if that environment variable is set,
else the platform's cache folder for ``napari-sam`` (for example
``~/.cache/napari-sam`` on Linux). A file that is already there is used
without any network access once its hash has been checked. The result of
that check is remembered in a small sidecar file (``<file>.verified.json``,
keyed by the file's size and modification time), so a 2.5 GB file is hashed
once, not on every load.

Downloads go to a temporary file in the cache folder, are checked, and only
then renamed into place, so an interrupted download never leaves a file that
looks complete.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from tqdm.auto import tqdm

from .progress import Job, Progress, run
from .zoo import ModelEntry

logger = logging.getLogger(__name__)

#: Environment variable that overrides the cache folder.
CACHE_ENV_VAR = "NAPARI_SAM_CACHE"

_CHUNK = 4 * 1024 * 1024
_DOWNLOAD_CHUNK = 1024 * 1024  # small enough that a slow connection reports progress and stops often
_TIMEOUT_S = 60
_SIDECAR_SUFFIX = ".verified.json"
_REJECTED_SUFFIX = ".rejected"
_USER_AGENT = "napari-sam (samcore weight download)"

# Errors of opening or reading a URL (URLError and socket errors are OSErrors).
_NETWORK_ERRORS = (OSError, http.client.HTTPException)

# The function that opens URLs; tests replace it to simulate a missing network.
_open_url: Callable[..., BinaryIO] = urllib.request.urlopen


class WeightsUnavailableError(RuntimeError):
    """Model weights are neither in the cache nor downloadable right now.

    Attributes:
        url: The address the file is downloaded from.
        destination: Where the file has to be placed by hand.
    """

    def __init__(self, message: str, url: str, destination: Path) -> None:
        super().__init__(message)
        self.url = url
        self.destination = destination


class HashMismatchError(RuntimeError):
    """A weight file does not have the hash published for it.

    Attributes:
        path: The file that was checked.
        expected: The published ``"<algorithm>:<digest>"``.
        actual: The ``"<algorithm>:<digest>"`` of the file.
    """

    def __init__(self, message: str, path: Path, expected: str, actual: str) -> None:
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.actual = actual


def cache_dir() -> Path:
    """Return the folder downloaded weights are kept in (it may not exist yet).

    Returns:
        ``$NAPARI_SAM_CACHE`` if set, else the platform cache folder for napari-sam.
    """
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    import pooch

    return Path(pooch.os_cache("napari-sam"))


def cached_path(entry: ModelEntry) -> Path:
    """Return where the weights of ``entry`` are (or will be) stored.

    Args:
        entry: A model registry entry.

    Returns:
        The path inside the cache folder, or inside the package for packaged weights.
    """
    if entry.packaged:
        return packaged_path(entry.filename)
    return cache_dir() / entry.filename


def packaged_path(filename: str) -> Path:
    """Return the path of a weight file shipped in the package folder ``samcore/weights``."""
    return Path(__file__).resolve().parent / "weights" / filename


def is_cached(entry: ModelEntry) -> bool:
    """Return whether the weights of ``entry`` are in the cache folder.

    The file's hash is not checked here; ``fetch`` does that before use.

    Args:
        entry: A model registry entry.

    Returns:
        True if the file exists.
    """
    return cached_path(entry).is_file()


def file_hash(path: str | os.PathLike, algorithm: str) -> str:
    """Hash a file in chunks.

    Args:
        path: The file.
        algorithm: ``"xxh128"`` (needs the ``xxhash`` package) or any
            ``hashlib`` algorithm such as ``"sha256"``.

    Returns:
        The lower-case hex digest.

    Raises:
        ValueError: The algorithm is unknown.
        ImportError: ``xxh128`` was asked for and ``xxhash`` is not installed.
    """
    hasher = _new_hasher(algorithm)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest().lower()


def fetch(entry: ModelEntry, progress: bool = True) -> Path:
    """Return the local path of verified weights, downloading them if needed (`fetch_job`, run to its end).

    Args:
        entry: The model registry entry.
        progress: Show a progress bar while downloading.

    Returns:
        The path of the file in the cache folder; its hash matches ``entry.hash``.

    Raises:
        WeightsUnavailableError: The file is not cached and cannot be
            downloaded (for example without internet access); the message names
            the URL and the exact path to put the file at by hand.
        HashMismatchError: The cached or downloaded file has the wrong hash.
            The file is moved out of the way (cached file) or deleted
            (download), so it is not used again.
    """
    return run(fetch_job(entry, progress))


def fetch_job(entry: ModelEntry, progress: bool = True) -> Job[Path]:
    """`fetch` step by step, for callers that show a download's progress and may stop it.

    Yields:
        ``Progress("download", bytes received, bytes expected)`` after each chunk of a download (the
        size expected is 0 when the server does not say); nothing for a file already there.

    Returns:
        The path of the verified file. Closing the job part-way deletes what was downloaded.
    """
    destination = cached_path(entry)
    if entry.packaged:
        _verify_packaged(destination, entry)
        return destination
    if destination.is_file():
        _verify_cached(destination, entry)
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = yield from _download_to_temporary(entry, destination, progress)
    try:
        _verify_download(partial, destination, entry)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, destination)
    _write_sidecar(destination, entry.hash_algorithm, entry.hash_digest)
    return destination


def _new_hasher(algorithm: str) -> Any:
    """Return a hash object with ``update`` and ``hexdigest`` (hashlib or xxhash)."""
    name = algorithm.lower()
    if name == "xxh128":
        try:
            import xxhash
        except ImportError as error:
            raise ImportError(
                "Checking this model file needs the 'xxhash' package. Install it with: pip install xxhash"
            ) from error
        return xxhash.xxh3_128()
    try:
        return hashlib.new(name)
    except ValueError as error:
        raise ValueError(f"Unknown hash algorithm {algorithm!r}.") from error


def _verify_packaged(path: Path, entry: ModelEntry) -> None:
    """Check a weight file that came with the package; a damaged installation is named as such."""
    if not path.is_file():
        raise WeightsUnavailableError(
            f"The weights of {entry.name!r} should have been installed with napari-sam at {path}, "
            "but the file is missing. Reinstall napari-sam (pip install --force-reinstall napari-sam).",
            url=entry.url,
            destination=path,
        )
    actual = file_hash(path, entry.hash_algorithm)
    if actual != entry.hash_digest:
        raise HashMismatchError(
            f"The weights of {entry.name!r} installed with napari-sam at {path} are damaged or were "
            f"replaced: expected {entry.hash}, found {entry.hash_algorithm}:{actual}. "
            "Reinstall napari-sam (pip install --force-reinstall napari-sam).",
            path=path,
            expected=entry.hash,
            actual=f"{entry.hash_algorithm}:{actual}",
        )


def _verify_cached(path: Path, entry: ModelEntry) -> None:
    if _sidecar_confirms(path, entry.hash_algorithm, entry.hash_digest):
        return
    logger.info("Checking the %s hash of %s (once per file).", entry.hash_algorithm, path)
    actual = file_hash(path, entry.hash_algorithm)
    if actual == entry.hash_digest:
        _write_sidecar(path, entry.hash_algorithm, actual)
        return
    rejected = _move_aside(path)
    raise HashMismatchError(
        f"The cached model file {path} for {entry.name!r} is damaged or is a different file: "
        f"expected {entry.hash}, found {entry.hash_algorithm}:{actual}. "
        f"It was moved to {rejected} (you can delete it). Run again to download a fresh copy from "
        f"{entry.url}, or put the correct file at {path}.",
        path=path,
        expected=entry.hash,
        actual=f"{entry.hash_algorithm}:{actual}",
    )


def _verify_download(partial: Path, destination: Path, entry: ModelEntry) -> None:
    actual = file_hash(partial, entry.hash_algorithm)
    if actual != entry.hash_digest:
        raise HashMismatchError(
            f"The downloaded model file for {entry.name!r} from {entry.url} is damaged or has "
            f"changed: expected {entry.hash}, found {entry.hash_algorithm}:{actual}. "
            f"It was deleted and nothing was saved at {destination}. Try again later; if this "
            "keeps happening the file on the server differs from the published one.",
            path=destination,
            expected=entry.hash,
            actual=f"{entry.hash_algorithm}:{actual}",
        )


def _download_to_temporary(entry: ModelEntry, destination: Path, progress: bool) -> Job[Path]:
    handle, name = tempfile.mkstemp(prefix=destination.name + ".", suffix=".part", dir=destination.parent)
    partial = Path(name)
    try:  # GeneratorExit too: a job closed part-way leaves no partial file
        with os.fdopen(handle, "wb") as sink:
            yield from _stream(entry, destination, sink, progress)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return partial


def _stream(entry: ModelEntry, destination: Path, sink: BinaryIO, progress: bool) -> Job[None]:
    request = urllib.request.Request(entry.url, headers={"User-Agent": _USER_AGENT})
    try:
        response = _open_url(request, timeout=_TIMEOUT_S)
    except _NETWORK_ERRORS as error:
        raise _unavailable(entry, destination, error) from error
    expected = _content_length(response)
    received = 0
    with (
        response,
        tqdm(
            total=expected,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"Downloading {entry.name}",
            disable=not progress,
        ) as bar,
    ):
        while chunk := _read_chunk(response, entry, destination):
            sink.write(chunk)
            bar.update(len(chunk))
            received += len(chunk)
            yield Progress("download", received, expected or 0)


def _read_chunk(response: BinaryIO, entry: ModelEntry, destination: Path) -> bytes:
    try:
        return response.read(_DOWNLOAD_CHUNK)
    except _NETWORK_ERRORS as error:
        raise _unavailable(entry, destination, error) from error


def _content_length(response: object) -> int | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _unavailable(entry: ModelEntry, destination: Path, error: BaseException) -> WeightsUnavailableError:
    reason = error.reason if type(error) is urllib.error.URLError else error
    return WeightsUnavailableError(
        f"Could not download the model {entry.name!r} ({reason}). "
        f"If this computer has no internet access, download {entry.url} on another computer "
        f"and copy the file to {destination} (exactly this name), then try again. "
        "Or use a weight file you have: checkpoint= in Python, --checkpoint on the command line, "
        "'checkpoint file…' in the widget's model list.",
        url=entry.url,
        destination=destination,
    )


def _move_aside(path: Path) -> Path:
    rejected = path.with_name(path.name + _REJECTED_SUFFIX)
    os.replace(path, rejected)
    _sidecar_path(path).unlink(missing_ok=True)
    return rejected


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR_SUFFIX)


def _fingerprint(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sidecar_confirms(path: Path, algorithm: str, digest: str) -> bool:
    try:
        record = json.loads(_sidecar_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = {**_fingerprint(path), "algorithm": algorithm, "digest": digest}
    return isinstance(record, dict) and all(record.get(key) == value for key, value in expected.items())


def _write_sidecar(path: Path, algorithm: str, digest: str) -> None:
    record = {**_fingerprint(path), "algorithm": algorithm, "digest": digest}
    sidecar = _sidecar_path(path)
    temporary = sidecar.with_name(sidecar.name + f".{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(record), encoding="utf-8")
        os.replace(temporary, sidecar)
    except OSError:
        # The sidecar only saves time; a read-only cache still works.
        temporary.unlink(missing_ok=True)
