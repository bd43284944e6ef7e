"""Preprocessing and augmentation on batches of tensors, identical on CPU and GPU.

Images travel as uint8 tensors `(B, 1, H, W)` until the last moment. `augment(...)` draws one random affine
transform per image (rotation, scale, translation, shear, flips) and applies it together with the resize to
the training size in a single `grid_sample`, then brightness/contrast and an occasional 3x3 Gaussian blur, all
batched: on a GPU the whole input pipeline is a handful of kernels. `normalize(...)` turns [0, 1] pixels into
the model's input (mean/std from the checkpoint, grey replicated to the model's channel count).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .io import resize_gray


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1, H, W) -> float32 in [0, 1]."""
    return x.float().div_(255.0)


def normalize(x: torch.Tensor, mean, std, channels: int) -> torch.Tensor:
    """[0, 1] grey (B, 1, H, W) -> normalised (B, channels, H, W) model input."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype).to(x.device, non_blocking=True).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype).to(x.device, non_blocking=True).view(1, -1, 1, 1)
    if channels > 1:
        x = x.expand(-1, channels, -1, -1)
    return (x - mean_t) / std_t


def resize_batch(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Decoded 2-D uint8 images of any size -> uint8 tensor (B, 1, size, size), by the one resize in io."""
    return torch.from_numpy(np.stack([resize_gray(img, size) for img in images]))[:, None]


def fit_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float (B, 1, H, W) resized to (size, size); a no-op when it already has that size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _random_params(n: int, acfg, gen: torch.Generator) -> torch.Tensor:
    """(n, 10) per-image draws from `gen` on the CPU: rotation, shear, 1/scale, tx, ty, flip x, flip y,
    brightness, contrast, blur. One tensor, so a GPU run copies it in one non-blocking transfer."""
    u = torch.rand(n, 10, generator=gen)

    def span(col, lo, hi):
        return lo + (hi - lo) * u[:, col]

    return torch.stack([
        torch.deg2rad(span(0, -acfg.rotate_deg, acfg.rotate_deg)),
        torch.deg2rad(span(1, -acfg.shear_deg, acfg.shear_deg)),
        # Sampling 1/scale keeps "scale 0.9-1.1" meaning the object appears 0.9-1.1x its size.
        1.0 / span(2, acfg.scale[0], acfg.scale[1]),
        span(3, -acfg.translate, acfg.translate) * 2,  # normalised coordinates span 2 per image width
        span(4, -acfg.translate, acfg.translate) * 2,
        torch.where(u[:, 5] < acfg.hflip_p, -1.0, 1.0),
        torch.where(u[:, 6] < acfg.vflip_p, -1.0, 1.0),
        span(7, 1 - acfg.brightness, 1 + acfg.brightness),
        span(8, 1 - acfg.contrast, 1 + acfg.contrast),
        (u[:, 9] < acfg.blur_p).float(),
    ], dim=1)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # A pageable host->GPU copy would synchronise with the GPU every step; pinned + non_blocking does not.
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def _theta(p: torch.Tensor) -> torch.Tensor:
    """(n, 2, 3) affine matrices (output -> input, normalised coordinates) from the drawn parameters:
    M = R(rot) @ Shear_x(shear) @ diag(flip_x, flip_y) / scale, then the translation."""
    rot, shear, inv_scale, tx, ty, fx, fy = p[:, :7].unbind(1)
    cos, sin, tan = torch.cos(rot), torch.sin(rot), torch.tan(shear)
    row0 = torch.stack([cos * fx * inv_scale, (cos * tan - sin) * fy * inv_scale, tx], 1)
    row1 = torch.stack([sin * fx * inv_scale, (sin * tan + cos) * fy * inv_scale, ty], 1)
    return torch.stack([row0, row1], 1)


def _blur3(x: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian blur (sigma 1) with replicated borders."""
    ax = torch.arange(-1, 2, device=x.device, dtype=x.dtype)
    k = torch.exp(-(ax**2) / 2)
    k = k / k.sum()
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None, :]).view(1, 1, 3, 3))


def augment(x: torch.Tensor, size: int, acfg, gen: torch.Generator, masks: torch.Tensor | None = None):
    """Random training views: uint8 (B, 1, H, W) on any device -> float (B, 1, size, size) in [0, 1].

    Random numbers come from `gen` (a CPU generator) so a seed gives the same views on CPU and GPU. With
    `masks` (B, 1, M, M) (lesion masks, `sources.box_masks`) returns `(views, masks)`: the masks moved by the same
    geometric transform, float (B, 1, M, M) in [0, 1]; the draws from `gen` are the same either way.
    """
    n, device = x.shape[0], x.device
    img = to_unit(x)
    if not acfg.enabled:
        return fit_size(img, size) if masks is None else (fit_size(img, size), masks.float())
    p = _to_device(_random_params(n, acfg, gen), device)
    theta = _theta(p)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    # Downsample first when the cache is much larger than the output, so grid_sample does not alias.
    if img.shape[-1] > 1.5 * size:
        img = fit_size(img, int(size * 1.15))
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out * p[:, 7].view(n, 1, 1, 1)
    mean = out.mean(dim=(2, 3), keepdim=True)
    out = ((out - mean) * p[:, 8].view(n, 1, 1, 1) + mean).clamp_(0.0, 1.0)
    if acfg.blur_p > 0:
        out = torch.where(p[:, 9].view(n, 1, 1, 1) > 0.5, _blur3(out), out)
    if masks is None:
        return out
    # Normalised coordinates make the same theta valid at the masks' own (smaller) resolution.
    mask_grid = F.affine_grid(theta, [n, 1, masks.shape[-2], masks.shape[-1]], align_corners=False)
    return out, F.grid_sample(masks.float(), mask_grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of (B, C, H, W), the test-time augmentation used by predictors."""
    return torch.flip(x, dims=[-1])

