"""corruptions.corrupt: names, shapes, dtypes, range, errors and per-sample seeding, for all 19."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from corruptions import CORRUPTIONS, SEVERITIES, CorruptionError, corrupt
from tests.reference import shim

#: corruptions that draw random numbers; the others must ignore the seed.
RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
          "elastic_transform", "speckle_noise", "spatter")
DETERMINISTIC = tuple(n for n in CORRUPTIONS if n not in RANDOM)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth images with edges and saturated regions (not just uniform noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, 5, 7, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    return (x * 1.2 - 0.1).clamp(0, 1)


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_names_are_imagecorruptions_order():
    assert list(CORRUPTIONS) == shim().get_corruption_names("all")
    assert SEVERITIES == (1, 2, 3, 4, 5)


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_shape_dtype_device_range_on_odd_sizes(name, dtype):
    x = _images(2, 33, 47).to(dtype)
    for severity in SEVERITIES:
        y = corrupt(x, name, severity, seed=torch.tensor([3, 4]))
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
        assert bool(torch.isfinite(y).all()) and float(y.min()) >= 0 and float(y.max()) <= 1
    assert not torch.equal(y, x)  # severity 5 changes the image


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_tall_and_wide_minimum_sizes(name):
    for h, w in [(32, 32), (32, 75), (64, 33)]:
        assert corrupt(_images(1, h, w), name, 3, seed=1).shape == (1, 3, h, w)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_the_memory_layout_does_not_change_the_output(name):
    """channels_last and strided views give bitwise the contiguous tensor's output (contrast's mean once
    differed by an ulp: the reduction order followed the strides)."""
    x = _images(2, 40, 52)
    taller = torch.zeros(2, 3, 80, 52)
    taller[:, :, ::2] = x
    want = corrupt(x, name, 3, seed=torch.tensor([5, 6]))
    for view in (x.contiguous(memory_format=torch.channels_last), taller[:, :, ::2]):
        assert torch.equal(corrupt(view, name, 3, seed=torch.tensor([5, 6])), want)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_the_thread_count_does_not_change_the_output(name):
    """1 and 2 torch threads give the same bits at every severity. zoom_blur differed by an ulp (torch's
    one-thread bilinear kernel for 3 channels rounds differently, so clipped_zoom resizes single planes), and
    defocus_blur too at this size (torch's complex product rounds its chunks' scalar tails differently, so
    filter2d_fft multiplies the spectra in real arithmetic); 97x160 showed neither."""
    x = _images(1, 480, 640, seed=3)
    seeds = torch.tensor([5])
    outputs = []
    for n in (1, 2):
        with _torch_threads(n):
            outputs.append([corrupt(x, name, severity, seed=seeds) for severity in SEVERITIES])
    for severity, one, two in zip(SEVERITIES, *outputs):
        assert torch.equal(one, two), severity


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_an_empty_batch_gives_an_empty_batch(name):
    x = torch.zeros(0, 3, 32, 40, dtype=torch.float64)
    for seed in (0, torch.zeros(0, dtype=torch.int64)):
        y = corrupt(x, name, 3, seed=seed)
        assert y.shape == x.shape and y.dtype == x.dtype and y is not x


@pytest.mark.parametrize("name", RANDOM)
def test_each_sample_depends_only_on_its_seed(name):
    """A batch of 3 equals each sample alone (bitwise), and the seed changes the draw."""
    x = _images(3, 40, 52, seed=1)
    seeds = torch.tensor([5, 6, 7])
    batch = corrupt(x, name, 3, seed=seeds)
    for b in range(3):
        alone = corrupt(x[b:b + 1], name, 3, seed=seeds[b:b + 1])
        assert torch.equal(batch[b:b + 1], alone), (name, b)
    # Reversed batch order: the same per-sample outputs.
    assert torch.equal(corrupt(x.flip(0), name, 3, seed=seeds.flip(0)), batch.flip(0))
    # Same seed, same output; another seed, another output; an int seed is that seed for every sample.
    assert torch.equal(corrupt(x, name, 3, seed=seeds), batch)
    assert not torch.equal(corrupt(x, name, 3, seed=seeds + 100), batch)
    assert torch.equal(corrupt(x[:1], name, 3, seed=5), batch[:1])


@pytest.mark.parametrize("name", RANDOM)
def test_severity_keys_the_stream(name):
    """Different severities use different streams (keyed by (seed, name, severity))."""
    from corruptions import Rng

    a = Rng([0], name, 1, torch.device("cpu")).uniform(4)
    b = Rng([0], name, 2, torch.device("cpu")).uniform(4)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruptions_ignore_the_seed_and_batch(name):
    x = _images(3, 40, 52, seed=2)
    with _torch_threads(2):  # jpeg_compression's pool (2 threads) against its single-image path
        y = corrupt(x, name, 4, seed=torch.tensor([1, 2, 3]))
    assert torch.equal(corrupt(x, name, 4, seed=99), y)
    for b in range(3):  # jpeg_compression codes the images on a thread pool: each result in its place
        assert torch.equal(corrupt(x[b:b + 1], name, 4), y[b:b + 1]), b



@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision's codecs; jpeg_compression hides it
@pytest.mark.parametrize("threads", [1, 2])
def test_jpeg_on_an_accelerator_codes_on_the_host_like_the_cpu(threads):
    """The path jpeg_compression takes for images on CUDA (8 bits on the device, one copy to the host, coded
    on its threads, one copy back), run here on CPU tensors: bit for bit the CPU path's output."""
    from corruptions.digital import JPEG_QUALITY, _jpeg_via_host

    x = _images(3, 41, 58, seed=5)
    with _torch_threads(threads):
        for severity in SEVERITIES:
            got = _jpeg_via_host(x, JPEG_QUALITY[severity - 1])
            assert got.dtype == x.dtype and torch.equal(got, corrupt(x, "jpeg_compression", severity)), severity


# ---------------------------------------------------------------- bad input


def _error(match: str, *args, **kwargs) -> str:
    with pytest.raises(CorruptionError, match=match) as exc:
        corrupt(*args, **kwargs)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_unknown_name_lists_the_valid_names():
    message = _error("unknown corruption 'gausian_noise'", _images(1, 32, 32), "gausian_noise", 1)
    assert all(n in message for n in CORRUPTIONS)
    assert isinstance(CorruptionError("x"), ValueError)
    _error(r"unknown corruption \['fog'\]; valid names", _images(1, 32, 32), ["fog"], 1)  # unhashable: no TypeError


@pytest.mark.parametrize("severity", [0, 6, -1, True, 2.0, "3", None, np.float64(2), np.bool_(True), np.int64(6)])
def test_bad_severity(severity):
    _error("severity .* use an integer in 1..5", _images(1, 32, 32), "fog", severity)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 32, 32), (1, 4, 32, 32), (1, 1, 3, 32, 32)])
def test_wrong_shape(shape):
    _error(r"shape \[B,3,H,W\]", torch.zeros(shape), "contrast", 1)


def test_not_a_tensor():
    _error("must be a torch.Tensor", [[0.5]], "contrast", 1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_dtype(dtype):
    _error("float tensor in \\[0,1\\]", torch.zeros(1, 3, 32, 32, dtype=dtype), "contrast", 1)


@pytest.mark.parametrize("value, seen", [(1.5, r"values in \[0, 1\.5\]"), (-0.01, r"values in \[-0\.01, "),
                                         (float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf")])
def test_values_outside_0_1(value, seen):
    x = _images(1, 32, 32)
    x[0, 1, 5, 7] = value
    _error(rf"^images hold {seen}.*; image values must lie in \[0,1\]", x, "brightness", 2)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_inputs_that_require_grad_are_corrupted_without_autograd(name):
    """No corruption is differentiable (jpeg is a codec); defocus_blur's in-place FFT product refused such input,
    and jpeg's pool threads (where torch.no_grad does not reach) could not read it. Two images on two threads."""
    x = _images(2, 36, 40).requires_grad_(True)
    with _torch_threads(2):
        y = corrupt(x, name, 3)
    assert not y.requires_grad and torch.equal(y, corrupt(x.detach(), name, 3))


def test_brightness_scales_tiny_values_like_any_other():
    """x' = x V'/V holds for any V > 0: 1e-13 grey is not treated as black (a clamp at 1e-12 did)."""
    x = torch.full((1, 3, 32, 32), 1e-13)
    x[0, 0, 0, 0] = 1e-20
    x[0, 1:, 0, 0] = 0
    y = corrupt(x, "brightness", 1)
    assert torch.allclose(y[0, :, 1, 1], torch.full((3,), 0.1), rtol=1e-6)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([0.1, 0.0, 0.0]), rtol=1e-6)


@pytest.mark.parametrize("hw", [(31, 40), (40, 31), (8, 8)])
def test_smaller_than_32_pixels(hw):
    _error("at least 32x32", torch.zeros(1, 3, *hw), "gaussian_blur", 1)


@pytest.mark.parametrize("seed", [1.5, "7", True, torch.tensor([1, 2]), torch.tensor([1.0]), torch.tensor(3),
                                  np.float64(7), np.bool_(True)])
def test_bad_seed(seed):
    _error("seed must be an int", _images(1, 32, 32), "gaussian_noise", 1, seed=seed)


@pytest.mark.parametrize("name", ["gaussian_noise", "spatter", "contrast"])
def test_numpy_integers_are_ints(name):
    """A severity or seed from ``np.arange`` or a DataFrame column is the int it holds."""
    x = _images(2, 40, 48)
    for severity in np.arange(1, 6):
        want = corrupt(x, name, int(severity), seed=7)
        assert torch.equal(corrupt(x, name, severity, seed=np.int64(7)), want)
        assert torch.equal(corrupt(x, name, np.int32(severity), seed=np.uint16(7)), want)
