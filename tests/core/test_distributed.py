"""A local Dask cluster of 2 workers gives the same embeddings and labels as the single-machine run."""

import distributed
import numpy as np
import pytest
import tifffile
import torch
import zarr

from samcore.build import ARCHITECTURES
from samcore.cli import main
from samcore.jobs import segment_everything
from samcore.synthetic import nuclei_stack
from tiny_models import TINY_MICRO, permissive_settings, tiny_sam


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        yield client


def test_two_workers_give_the_labels_of_the_local_run(tmp_path, client):
    model = tiny_sam()
    stack = nuclei_stack((6, 40, 48), n_nuclei=4, radius=(5.0, 8.0), seed=5)[0]
    settings = permissive_settings()
    local = segment_everything(stack, model, settings=settings, precision="fp32")
    steps = []
    spread = segment_everything(
        stack, model, settings=settings, precision="fp32", store=tmp_path / "s.zarr", client=client,
        on_progress=steps.append,
    )
    assert local.max() > 1
    np.testing.assert_array_equal(spread, local)
    assert sorted(s.z for s in steps if s.stage == "slices") == list(range(6))
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group["done"][:].all() and group["labels_done"][:].all()  # marked by the client


def test_slices_segmented_on_the_cluster_are_not_segmented_again(tmp_path, client, monkeypatch):
    import samcore.jobs

    model = tiny_sam()
    stack = nuclei_stack((4, 40, 48), n_nuclei=4, radius=(5.0, 8.0), seed=5)[0]
    options = {"settings": permissive_settings(), "precision": "fp32", "store": tmp_path / "s.zarr"}
    spread = segment_everything(stack, model, client=client, **options)

    def refused(*args, **kwargs):
        raise AssertionError("a slice was segmented again")

    monkeypatch.setattr(samcore.jobs, "segment_embedding", refused)
    np.testing.assert_array_equal(segment_everything(stack, model, **options), spread)


def test_cli_scheduler_fills_the_same_store(tmp_path, client, monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "micro_dask_test", TINY_MICRO)
    weights = tmp_path / "tiny.pth"
    torch.save(tiny_sam().state_dict(), weights)
    stack = nuclei_stack((5, 40, 48), n_nuclei=4, radius=(5.0, 8.0), seed=6)[0]
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    common = ["embed", str(tmp_path / "stack.tif"), "--checkpoint", str(weights), "--precision", "fp32"]
    assert main([*common, "--store", str(tmp_path / "local.zarr")]) == 0
    address = client.scheduler.address
    assert main([*common, "--store", str(tmp_path / "spread.zarr"), "--scheduler", address]) == 0
    local, spread = (zarr.open_group(str(tmp_path / f"{n}.zarr"), mode="r") for n in ("local", "spread"))
    assert spread["done"][:].all()
    np.testing.assert_array_equal(spread["features"][:], local["features"][:])


def test_a_worker_that_does_not_see_the_store_fails_loudly(tmp_path):
    from samcore.distributed import _open_spec

    with pytest.raises(FileNotFoundError, match="disk every worker shares"):
        _open_spec(("key", 3, str(tmp_path / "elsewhere.zarr"), "float16"))
    assert not (tmp_path / "elsewhere.zarr").exists()


def test_the_model_reaches_a_worker_process_whole_and_embeds_there():
    """What a cluster's worker process receives: the model through Dask's serialization."""
    from distributed.protocol import deserialize, serialize

    from samcore.distributed import ModelParcel
    from samcore.predictor import Predictor

    model = tiny_sam()
    here = Predictor(model, precision="fp32")  # the client's predictor hooks the encoder first
    received = deserialize(*serialize(ModelParcel(model))).model
    there = Predictor(received, precision="fp32")
    hooks = list(received.image_encoder._forward_pre_hooks.values())
    assert len(hooks) == 1  # the check came along, and was not added twice
    rgb = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    torch.testing.assert_close(there.embed_rgb(rgb).features, here.embed_rgb(rgb).features, rtol=0, atol=0)


@pytest.mark.slow
def test_worker_processes_give_the_labels_of_the_local_run(tmp_path):
    model = tiny_sam()
    stack = nuclei_stack((3, 40, 48), n_nuclei=4, radius=(5.0, 8.0), seed=5)[0]
    settings = permissive_settings()
    local = segment_everything(stack, model, settings=settings, precision="fp32")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        spread = segment_everything(
            stack, model, settings=settings, precision="fp32", store=tmp_path / "s.zarr", client=client
        )
    np.testing.assert_array_equal(spread, local)
