"""No test downloads: a private weights cache folder, and only local ``file:`` URLs opened."""

import urllib.error
from pathlib import Path

import pytest


def offline_cache(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point samcore's weights cache at `folder` and refuse every URL but a local file's."""
    from samcore import download

    monkeypatch.setenv(download.CACHE_ENV_VAR, str(folder))
    real_open = download._open_url

    def local_only(request, *args, **kwargs):
        if not request.full_url.startswith("file:"):
            raise urllib.error.URLError("network access is disabled in tests")
        return real_open(request, *args, **kwargs)

    monkeypatch.setattr(download, "_open_url", local_only)
    return folder
