"""int8 ViT encoding: close to fp32, refused where it cannot apply, fp32 where it cannot compile."""

import numpy as np
import pytest
import torch
from weights import randomize_

from samcore import Predictor, build_sam
from samcore.modeling import int8


@pytest.fixture(scope="module")
def model():
    return randomize_(build_sam("vit_test")).eval()


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:200, :240]
    blobs = ((yy - 90) ** 2 + (xx - 120) ** 2 < 40**2) * 150 + ((yy - 40) ** 2 + (xx - 50) ** 2 < 15**2) * 90
    return (blobs + rng.integers(0, 40, size=blobs.shape)).astype(np.uint8)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_int8_linear_is_close_to_the_fp32_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 40)
    x = torch.randn(50, 96)
    x[3] *= 100  # one loud token must not cost the others their precision
    quantized = int8.Int8Linear(layer)
    out = int8.int8_linear(x, *quantized.tensors())
    expected = layer(x).detach()
    assert relative_error(out[:3], expected[:3]) < 0.02
    assert relative_error(out, expected) < 0.02
    assert quantized.weight.dtype == torch.int8


def test_int8_embedding_stays_close_to_fp32(model, image):
    fp32 = Predictor(model, precision="fp32")
    reference = fp32.embed(image).features
    encoder = int8.Int8ImageEncoder(model.image_encoder, compiled=False)
    with torch.inference_mode():
        features = encoder(model.preprocess(fp32_input(fp32, image)))
    assert relative_error(features, reference) < 0.03


def fp32_input(predictor: Predictor, image: np.ndarray) -> torch.Tensor:
    from samcore.transforms import resized_shape
    from samcore.preprocess import resize_uint8

    rgb = np.repeat(image[..., None], 3, axis=2)
    resized = resize_uint8(rgb, resized_shape(*image.shape, predictor.model.img_size))
    return torch.from_numpy(resized).permute(2, 0, 1)[None].float()


@pytest.fixture()
def int8_is_fast(monkeypatch):
    """Take int8 as fast on any CPU, so that its path runs (slowly on CPUs without VNNI)."""
    from samcore import precision

    monkeypatch.setattr(precision, "cpu_int8_speedup", lambda: 3.0)


@pytest.mark.slow
def test_compiled_int8_predictor_gives_the_fp32_masks(model, image, int8_is_fast):
    fp32, fast = Predictor(model, precision="fp32"), Predictor(model, precision="int8")
    fp32.set_image(image)
    fast.set_image(image)
    assert fast.precision == "int8"
    assert relative_error(fast.get_image_embedding(), fp32.get_image_embedding()) < 0.03
    for box in ([70, 40, 170, 140], [30, 20, 70, 60]):
        expected = fp32.predict(box=np.array(box), return_logits=True)[0]
        masks = fast.predict(box=np.array(box), return_logits=True)[0]
        assert np.corrcoef(expected.ravel(), masks.ravel())[0, 1] > 0.99


def test_int8_weights_are_made_once_per_encoder(model):
    first = int8.Int8ImageEncoder(model.image_encoder, compiled=False)
    second = int8.Int8ImageEncoder(model.image_encoder, compiled=False)
    assert first._linears is second._linears
    other = build_sam("vit_test")
    assert int8.Int8ImageEncoder(other.image_encoder, compiled=False)._linears is not first._linears


def test_int8_is_refused_for_encoders_it_does_not_cover():
    with pytest.raises(ValueError, match="ViT encoders"):
        Predictor(build_sam("micro_v1"), precision="int8")


def test_int8_falls_back_to_fp32_with_a_warning_when_it_cannot_compile(
    model, image, monkeypatch, int8_is_fast
):
    def no_compiler(*args, **kwargs):
        raise torch._inductor.exc.InductorError(RuntimeError("C++ compiler not found"), None)

    monkeypatch.setattr(int8, "compiled_halves", lambda: (no_compiler, no_compiler))
    predictor = Predictor(model, precision="int8")
    with pytest.warns(UserWarning, match="could not be compiled.*fp32"):
        predictor.set_image(image)
    assert predictor.precision == "fp32"
    expected = Predictor(model, precision="fp32").embed(image).features
    assert torch.equal(predictor.get_image_embedding(), expected)


def test_int8_on_a_cpu_without_int8_instructions_warns_and_uses_fp32(model, monkeypatch):
    from samcore import precision

    speedup = precision.cpu_int8_speedup()  # the real measurement runs on any machine
    assert np.isfinite(speedup) and speedup >= 0
    monkeypatch.setattr(precision, "cpu_int8_speedup", lambda: 0.02)  # as measured on an AVX2-only EPYC
    with pytest.warns(UserWarning, match="int8.*50 times slower than fp32.*VNNI.*using fp32"):
        predictor = Predictor(model, precision="int8")
    assert predictor.precision == "fp32"


@pytest.mark.parametrize(
    ("arch", "kind"), [("micro_v1", "the bundled model's kind"), ("vit_t", "MobileSAM's TinyViT")]
)
def test_int8_for_other_encoders_is_refused_in_words_a_user_knows(arch, kind):
    with pytest.raises(ValueError, match=f"not {kind}: use fp32 .*--precision fp32"):
        Predictor(build_sam(arch), precision="int8")
