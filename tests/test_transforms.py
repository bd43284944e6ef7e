import numpy as np
import torch

from bonefrac.config import AugmentConfig
from bonefrac.transforms import augment, normalize, resize_batch


def _bar_image(size=64):
    img = np.zeros((size, size), np.uint8)
    img[:, : size // 4] = 255  # a bright band on the left
    return img


def test_identity_augment_is_a_resize():
    x = torch.from_numpy(_bar_image())[None, None]
    off = AugmentConfig(rotate_deg=0, hflip_p=0, brightness=0, contrast=0, scale=(1, 1), translate=0,
                        shear_deg=0, blur_p=0)
    out = augment(x, 32, off, torch.Generator().manual_seed(0))
    assert out.shape == (1, 1, 32, 32)
    assert out[0, 0, :, :6].mean() > 0.95 and out[0, 0, :, 10:].mean() < 0.05


def test_hflip_moves_the_band():
    x = torch.from_numpy(_bar_image())[None, None]
    flip = AugmentConfig(rotate_deg=0, hflip_p=1.0, brightness=0, contrast=0, scale=(1, 1), translate=0,
                         shear_deg=0, blur_p=0)
    out = augment(x, 32, flip, torch.Generator().manual_seed(0))
    assert out[0, 0, :, -6:].mean() > 0.95 and out[0, 0, :, :20].mean() < 0.05


def test_augment_is_seeded_and_in_range():
    x = torch.randint(0, 256, (4, 1, 40, 40), dtype=torch.uint8)
    cfg = AugmentConfig(blur_p=0.5)
    a = augment(x, 32, cfg, torch.Generator().manual_seed(3))
    b = augment(x, 32, cfg, torch.Generator().manual_seed(3))
    c = augment(x, 32, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and a.shape == (4, 1, 32, 32)


def test_rotation_keeps_the_centre():
    img = np.zeros((64, 64), np.uint8)
    img[28:36, 28:36] = 255  # a bright square at the centre survives any rotation
    x = torch.from_numpy(img)[None, None].repeat(8, 1, 1, 1)
    cfg = AugmentConfig(rotate_deg=25, hflip_p=0.5, brightness=0, contrast=0, scale=(1, 1), translate=0,
                        shear_deg=0, blur_p=0)
    out = augment(x, 64, cfg, torch.Generator().manual_seed(1))
    assert (out[:, 0, 31:33, 31:33] > 0.9).all()


def test_normalize_replicates_grey():
    x = torch.full((2, 1, 4, 4), 0.5)
    out = normalize(x, [0.5, 0.25, 0.0], [0.5, 0.25, 1.0], 3)
    assert out.shape == (2, 3, 4, 4)
    assert torch.allclose(out[:, 0], torch.zeros(2, 4, 4)) and torch.allclose(out[:, 1], torch.ones(2, 4, 4))
    assert torch.allclose(out[:, 2], torch.full((2, 4, 4), 0.5))


def test_resize_batch_shapes():
    out = resize_batch([np.zeros((30, 50), np.uint8), np.full((70, 20), 9, np.uint8)], 16)
    assert out.shape == (2, 1, 16, 16) and out.dtype == torch.uint8 and int(out[1].max()) == 9
