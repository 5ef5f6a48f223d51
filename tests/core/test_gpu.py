"""On a CUDA GPU, the same embeddings and masks as on the CPU: fused attention in the global blocks, several
slices a pass, prompts decoded all at once. Skipped where there is no CUDA GPU (CI has none)."""

import numpy as np
import pytest
import torch
from weights import randomize_

from samcore import Predictor, build_sam
from samcore.build import ViTConfig
from samcore.embeddings import EmbeddingStore, StackView, embed_slices

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# A 1024 px input: its global block attends over 4096 tokens, which a GPU runs as fused attention.
GLOBAL = ViTConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=6, img_size=1024)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cpu = randomize_(build_sam(GLOBAL).eval(), seed=2)
    gpu = build_sam(GLOBAL).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to("cuda")


def stack():
    return np.random.default_rng(3).integers(0, 4000, size=(5, 200, 260)).astype(np.uint16)


def test_a_stack_embedded_on_the_gpu_in_passes_matches_the_cpu(models):
    cpu, gpu = models
    view = StackView.of(stack())
    stores = {}
    for name, model in (("cpu", cpu), ("gpu", gpu)):
        predictor = Predictor(model, precision="fp32", views=2)
        stores[name] = EmbeddingStore("key", view.n_slices)
        assert list(embed_slices(predictor, view, stores[name], range(5))) == list(range(5))
    assert Predictor(gpu, precision="fp32").embed_batch > 1
    for z in range(5):
        on_gpu = stores["gpu"].get(z).features.cpu()
        torch.testing.assert_close(on_gpu, stores["cpu"].get(z).features, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("refine", [False, True])
def test_prompts_decoded_all_at_once_on_the_gpu_match_the_cpus_rewrite(models, refine):
    cpu, gpu = models
    image = StackView.of(stack()).rgb_slice(2)
    predictors = [Predictor(model, precision="fp32", refine=refine) for model in (cpu, gpu)]
    for predictor in predictors:
        predictor.set_image(image)
    assert predictors[1].decodes_in_batches and not predictors[0].decodes_in_batches
    prompts = [
        {"point_coords": np.array([[80.0, 90.0]]), "point_labels": np.array([1])},
        {"box": np.array([40.0, 30.0, 150.0, 120.0])},
        {"box": np.array([40.0, 30.0, 150.0, 120.0]), "point_coords": np.array([[60.0, 50.0]]),
         "point_labels": np.array([0])},
    ]
    for kwargs in prompts:
        on_cpu, on_gpu = (p.predict(**kwargs, return_logits=True) for p in predictors)
        for cpu_part, gpu_part in zip(on_cpu, on_gpu):
            np.testing.assert_allclose(gpu_part, cpu_part, rtol=1e-3, atol=2e-3)


def test_bf16_on_the_gpu_keeps_the_masks(models):
    _, gpu = models
    image = StackView.of(stack()).rgb_slice(1)
    masks = []
    for precision in ("fp32", "bf16"):
        predictor = Predictor(gpu, precision=precision)
        predictor.set_image(image)
        masks.append(predictor.predict(box=np.array([40.0, 30.0, 150.0, 120.0]), multimask_output=False)[0][0])
    union = np.logical_or(*masks).sum()
    assert union and np.logical_and(*masks).sum() / union >= 0.97
