"""Keeping freed memory for reuse: set once per process, for CPU predictors, unless turned off."""

import sys

import pytest
import torch

from samcore import Predictor, allocator, build_sam


@pytest.fixture
def fresh(monkeypatch):
    """The module as in a new process (the thresholds not tried yet)."""
    monkeypatch.setattr(allocator, "_done", None)
    return allocator


def test_turned_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv(allocator.ENV_VAR, "default")
    assert fresh.reuse_freed_memory() is False
    monkeypatch.delenv(allocator.ENV_VAR)
    assert fresh.reuse_freed_memory() is False  # decided once per process


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_set_on_linux_once_for_a_cpu_predictor(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(fresh, "_set_thresholds", lambda: calls.append(1) or True)
    torch.manual_seed(0)
    model = build_sam("vit_test")
    Predictor(model)
    Predictor(model)
    assert calls == [1] and fresh.reuse_freed_memory() is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_takes_the_thresholds(fresh):
    assert fresh._set_thresholds() is True
