"""Quality figures: sharpness follows blur; PSNR/SSIM equal scikit-image's."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from deblur.observe import quality
from deblur.dev.samples import make_scene, motion_blur


@pytest.mark.parametrize("angle", [0.0, 30.0, 45.0, 90.0, 135.0])
def test_more_blur_means_lower_sharpness(angle: float) -> None:
    sharp = make_scene(np.random.default_rng(0), 128, 160)
    lengths = [1, 5, 9, 15]
    laps, tens = zip(*(quality.sharpness(motion_blur(sharp, n, angle) if n > 1 else sharp)
                       for n in lengths))
    assert list(laps) == sorted(laps, reverse=True) and laps[0] > 4 * laps[-1]
    assert list(tens) == sorted(tens, reverse=True) and tens[0] > 2 * tens[-1]


@pytest.mark.parametrize("angle", [0.0, 45.0, 90.0, 135.0])
def test_ratio_is_below_one_for_a_blurred_copy_and_above_one_the_other_way(angle: float) -> None:
    # sharpness_ratio = output / input: a "deblurrer" that blurs must score under 1, one that
    # sharpens (the blurred photo in, the sharp scene out) over 1, whatever the blur direction.
    sharp = make_scene(np.random.default_rng(1), 96, 96)
    blurred = motion_blur(sharp, 9, angle)
    (lap_sharp, ten_sharp), (lap_blur, ten_blur) = map(quality.sharpness, (sharp, blurred))
    assert lap_blur / lap_sharp < 0.3 and ten_blur / ten_sharp < 0.5
    assert lap_sharp / lap_blur > 1 / 0.3 and ten_sharp / ten_blur > 2.0


@pytest.mark.parametrize("seed", range(5))
def test_psnr_and_ssim_match_scikit_image(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(7, 60, 2)
    ref = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    noise = rng.normal(0, rng.uniform(2, 40), ref.shape)
    out = np.clip(ref + noise, 0, 255).astype(np.uint8)
    x, y = out / 255.0, ref / 255.0
    expected_psnr = peak_signal_noise_ratio(y, x, data_range=1)
    expected_ssim = structural_similarity(y, x, data_range=1, channel_axis=2)
    assert abs(quality.psnr(out, ref) - expected_psnr) < 1e-6
    assert abs(quality.ssim(out, ref) - expected_ssim) < 1e-6


def test_sixteen_bit_and_errors() -> None:
    ref = np.random.default_rng(3).integers(0, 65536, (20, 20, 3)).astype(np.uint16)
    assert quality.psnr(ref, ref) == float("inf") and quality.ssim(ref, ref) == pytest.approx(1)
    with pytest.raises(ValueError, match="differ in size"):
        quality.psnr(ref, ref[:10])
    with pytest.raises(ValueError, match="smaller than"):
        quality.ssim(ref[:5, :5], ref[:5, :5])


def test_sampling_is_deterministic_and_near_the_rate() -> None:
    picks = [quality.sampled(i, 0.1, seed=7) for i in range(20000)]
    assert picks == [quality.sampled(i, 0.1, seed=7) for i in range(20000)]
    assert 0.09 < sum(picks) / len(picks) < 0.11
    assert all(quality.sampled(i, 1.0) for i in range(10))
    assert not any(quality.sampled(i, 0.0) for i in range(10))
