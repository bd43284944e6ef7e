"""Grad-CAM heatmaps: where in the X-ray the model looked for the class it scored.

    heatmaps = gradcam(predictor, [read_image(p)])   # list of float32 (H, W) in [0, 1], one per image
    rgb = overlay(read_image(p), heatmaps[0])         # (H, W, 3) uint8, the heatmap blended onto the X-ray

`predictor` is a `bonefrac.predict.Predictor` or `Ensemble` (whose map is its members' maps averaged, weighted
like their probabilities; the class and probabilities are the ensemble's, as predict gives them). The target
layer is the model's last 4-D feature map before global pooling: timm's `forward_features` output (CNNs,
EfficientNets, ConvNeXts; Swin's channels-last map too), or, for a model without it, the last module whose output
is 4-D, found with forward hooks. Token models
(ViT) have no such map and are refused with a clear error. A heatmap explains one class score (the logit); by
default the class the predictor decides on. With the predictor's tta (a horizontally flipped view averaged in, as
predict does), the flipped view's map is mirrored back and averaged in too.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BonefracError
from .io import printable_path, write_atomically
from . import predict as _predict  # by module: uses_autocast is looked up at call time (tests switch it)
from .predict import _read_checked, decide, infer_logits, model_input, with_flipped_view
from .transforms import hflip, resize_batch

log = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.6  # opacity of the hottest pixels; cold regions leave the X-ray untouched


def gradcam(predictor, images: list[np.ndarray], target_class: int | None = None,
            batch_size: int = 16) -> list[np.ndarray]:
    """Grad-CAM heatmaps, float32 (H, W) at each image's own size, min-max scaled to [0, 1] at the model's
    resolution and stretched to the image (all zeros when the map is flat: nothing is localised).

    `images` are decoded 2-D uint8 arrays of any size; `target_class` is a class index, or None for the
    class the predictor predicts for each image (its validation threshold for binary models).
    """
    return explain_arrays(predictor, images, target_class, batch_size)[0]


def explain_arrays(predictor, images: list[np.ndarray], target_class=None, batch_size: int = 16,
                   at_image_size: bool = True) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(heatmaps as in `gradcam`, explained class index per image, the predictor's calibrated probabilities
    (n, K), as `predict` reports them). `target_class` may also be a sequence with one class index per image. An
    ensemble explains the class it predicts itself (at its own threshold) unless one is given; its map is the
    average of its members' maps for that class (each scaled to [0, 1] first: raw Grad-CAM magnitudes are not
    comparable between models), weighted like their probabilities. `at_image_size=False`: each map stays at the
    model's input size (S, S; an ensemble's largest), already scaled to [0, 1]; `overlay` stretches it to whatever
    image it draws on (a batch of full-size float32 maps of large radiographs would take gigabytes)."""
    members = getattr(predictor, "members", None) or [predictor]
    n_classes = len(members[0].class_names)
    targets = None if target_class is None else np.array(np.broadcast_to(np.asarray(target_class, int), (len(images),)))
    if targets is not None and len(targets) and not ((targets >= 0) & (targets < n_classes)).all():
        raise BonefracError(f"class index {target_class} is outside 0..{n_classes - 1} ({members[0].class_names})")
    heatmaps, classes, probs = [], [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        # Each member's Grad-CAM forward also gives its share of the prediction: one forward per member and batch.
        forwards = [_forward_or_probs(m, chunk, len(members) > 1) for m in members]
        chunk_probs = predictor.combine([f[2] for f in forwards]) if len(members) > 1 else forwards[0][2]
        target = (decide(chunk_probs, predictor.positive_index, predictor.threshold) if targets is None
                  else targets[start:start + batch_size])
        mapped = [(m, f, w) for m, f, w in zip(members, forwards, getattr(predictor, "weights", [1.0]))
                  if f[0] is not None]
        maps = [_member_maps(m, f, target) for m, f, _ in mapped]
        unit = maps[0] if len(maps) == 1 else _weighted_maps(maps, [w for _, _, w in mapped])
        heatmaps += [_to_image_size(u, img.shape) for u, img in zip(unit, chunk)] if at_image_size else list(unit)
        classes.append(np.asarray(target))
        probs.append(chunk_probs)
    if not images:
        return [], np.zeros(0, int), np.zeros((0, n_classes))
    return heatmaps, np.concatenate(classes), np.concatenate(probs)


def _forward_or_probs(member, chunk: list[np.ndarray], in_ensemble: bool):
    """`_forward` of the member on `chunk`; in an ensemble, a member without a spatial feature map (a ViT, say)
    gives only its probabilities, (None, None, probs, None), and the others draw the map (an error if none can)."""
    try:
        return _forward(member, resize_batch(chunk, member.size))
    except BonefracError as exc:
        if not in_ensemble:
            raise
        log.warning("ensemble member %s has no map to explain (%s); the others draw the ensemble's map",
                    member.path or type(member.model).__name__, exc)
        return None, None, member.predict_arrays(chunk), None


def _member_maps(member, forward, target) -> np.ndarray:
    """One member's maps for `target`, (B, S, S) scaled to [0, 1] at its input size S."""
    feats, logits, _, flipped = forward
    cams = _cam(member, feats, logits, target)
    if flipped is not None:  # tta: predict averages both views, so the map does too (the flipped one mirrored)
        cams = 0.5 * (cams + _cam(member, *flipped, target)[:, :, ::-1])
    return np.stack([_unit_range(c) for c in cams])  # scaled at the model's resolution, then (maybe) stretched


def _weighted_maps(maps: list[np.ndarray], weights) -> np.ndarray:
    """Members' (B, S_i, S_i) unit maps averaged with `weights` at the largest S, then scaled to [0, 1] again (so
    the weights' sum does not matter)."""
    if not maps:
        raise BonefracError("no member of this ensemble has a spatial feature map to explain (token models such as "
                            "ViT have none)")
    size = max(m.shape[-1] for m in maps)
    mixed = sum(float(w) * (F.interpolate(torch.from_numpy(np.ascontiguousarray(m))[:, None], size=(size, size),
                                          mode="bilinear", align_corners=False)[:, 0].numpy()
                            if m.shape[-1] != size else m) for w, m in zip(weights, maps))
    return np.stack([_unit_range(c) for c in mixed])


def _forward(member, x_uint8: torch.Tensor):
    """(feature map, logits) of a float32 forward for Grad-CAM, the calibrated probabilities `predict` gives for
    the batch, and with tta the flipped view's (feature map, logits), else None. The class explained follows
    predict's own forward (bf16 autocast on CUDA, the flipped view with tta), so explain reports predict's class;
    the maps come from float32 on every device (with bf16 features and gradients the shipped model's map peak moved
    by more than 15 px on 5 of 32 images, in a CPU emulation). Without autocast the float32 logits are predict's
    own, so with tta the two Grad-CAM forwards are all it takes. Checked on an H100 with bf16 autocast: class and
    probability equal predict's on all 609 FracAtlas test images that pass the radiograph check."""
    x = x_uint8.to(member.device)
    inp = model_input(member.model, x, member.prep)
    feats, logits = _features_and_logits(member.model, inp)
    flipped = _features_and_logits(member.model, hflip(inp)) if member.tta else None
    if _predict.uses_autocast(x.device):  # predict's bf16 forward differs from this float32 one: run it
        scored = infer_logits(member.model, x, member.prep, tta=member.tta)
    elif member.tta:  # predict's combination of the two views, fed the flipped view's logits computed above
        scored = with_flipped_view(lambda _flipped_input: flipped[1].detach(), inp, logits.detach())
    else:
        scored = logits.detach()
    return feats, logits, member.calibrated(scored.cpu().numpy()), flipped


def _cam(member, feats: torch.Tensor, logits: torch.Tensor, target) -> np.ndarray:
    """Grad-CAM at the feature map's resolution upsampled to the model's input size: (B, S, S) numpy."""
    score = logits.gather(1, torch.as_tensor(target, device=logits.device).view(-1, 1)).sum()
    grads, = torch.autograd.grad(score, feats)
    # Grad-CAM: channel weights are the spatially averaged gradients; keep only positive evidence.
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * feats.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=(member.size, member.size), mode="bilinear", align_corners=False)[:, 0]
    return cam.cpu().numpy().astype(np.float32)


def _features_and_logits(model, inp: torch.Tensor):
    """(last feature map as (B, C, h, w) requiring grad, logits). Only the head is differentiated: the backbone
    runs without a graph, which keeps memory at inference level. NHWC features (Swin) are explained in NCHW;
    token sequences (ViT) have no spatial map to explain: BonefracError."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        with torch.no_grad():
            feats = model.forward_features(inp)
        if feats.ndim != 4:
            raise BonefracError(f"{type(model).__name__} gives {feats.ndim}-D features (tokens), not a spatial "
                                "feature map; Grad-CAM here needs a convolutional or Swin-like model")
        nhwc = _channels_last_output(model, feats)
        leaf = (feats.permute(0, 3, 1, 2) if nhwc else feats).detach().float().requires_grad_(True)
        with torch.enable_grad():
            return leaf, model.forward_head(leaf.permute(0, 2, 3, 1) if nhwc else leaf).float()
    return _hooked_features_and_logits(model, inp)


def _channels_last_output(model, feats: torch.Tensor) -> bool:
    """True when a timm model emits NHWC features (e.g. Swin): the channel count sits in the last axis."""
    channels = getattr(model, "num_features", None)
    return channels is not None and feats.shape[-1] == channels and feats.shape[1] != channels


def _hooked_features_and_logits(model, inp: torch.Tensor):
    """Fallback for any module: the output of the last module (in execution order) that is 4-D."""
    layer = find_target_layer(model, inp)
    captured = {}

    def keep(_module, _inputs, output):
        captured["feats"] = output

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            inp = inp.detach().requires_grad_(True)  # so a graph exists even with frozen weights
            logits = model(inp).float()
    finally:
        handle.remove()
    return captured["feats"], logits


def find_target_layer(model, inp: torch.Tensor) -> torch.nn.Module:
    """The last module whose output is a 4-D (B, C, h, w) feature map with h, w > 1 when run on `inp` (logged, with
    a warning when later 4-D maps were 1 x 1: the input is too small for the last stage, so the map is shallower)."""
    order, handles = [], []
    for name, module in model.named_modules():
        if module is model:
            continue
        handles.append(module.register_forward_hook(
            lambda m, _i, out, name=name: order.append((name, m, tuple(out.shape[-2:])))
            if torch.is_tensor(out) and out.ndim == 4 else None))
    try:
        with torch.no_grad():
            model(inp[:1])
    finally:
        for h in handles:
            h.remove()
    spatial = [item for item in order if item[2][-1] > 1]
    if not spatial:
        raise BonefracError(f"{type(model).__name__}: no 4-D feature map found; Grad-CAM needs a CNN-like model")
    name, layer, size = spatial[-1]
    log.info("Grad-CAM layer of %s: %s (%d x %d map)", type(model).__name__, name, *size)
    later = order[order.index(spatial[-1]) + 1:]
    if any("pool" not in type(m).__name__.lower() for _, m, _ in later):  # global pooling is 1 x 1 by design
        log.warning("Grad-CAM uses %s: later feature maps are 1 x 1 at %d px input, too small to localise; a larger "
                    "input size gives a deeper map", name, inp.shape[-1])
    return layer


def _unit_range(cam: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1]. A flat map (no positive evidence, or the same everywhere) localises nothing
    and becomes all zeros. Subtracting the minimum matters for weakly trained models, whose maps are a large
    constant plus a small bump that would otherwise paint the whole image."""
    low, high = float(cam.min()), float(cam.max())
    if high - low <= 1e-6 * max(abs(high), 1e-12):
        return np.zeros_like(cam, dtype=np.float32)
    return ((cam - low) / (high - low)).clip(0, 1).astype(np.float32)


def _to_image_size(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The model input was the whole image squashed to a square, so stretching back inverts it exactly."""
    if cam.shape == tuple(shape):
        return cam
    t = torch.from_numpy(cam)[None, None]
    out = F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0]
    return out.clamp_(min=0).numpy().astype(np.float32)  # bilinear never overshoots; kept for safety


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The X-ray (2-D uint8) as RGB uint8 with the heatmap (jet colours) blended in where it is hot.

    The heatmap is resized to the image when their sizes differ.
    """
    from matplotlib import colormaps

    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"overlay needs a 2-D grayscale image, got shape {image.shape}")
    heat = _to_image_size(np.clip(np.asarray(heatmap, dtype=np.float32), 0, 1), image.shape)
    # The colormap as a 256-entry table indexed by uint8 (what matplotlib does with floats, without its float64
    # RGBA copy of the image); blending in float32 one channel at a time keeps a large image's cost low.
    lut = colormaps["jet"](np.arange(256))[:, :3].astype(np.float32)
    index = np.minimum(heat * 256, 255).astype(np.uint8)
    weight = alpha * heat
    grey = image.astype(np.float32) / 255.0
    out = np.empty((*image.shape, 3), dtype=np.uint8)
    for c in range(3):
        blended = grey * (1 - weight) + lut[index, c] * weight
        out[..., c] = np.rint(np.clip(blended, 0, 1) * 255)
    return out


def explain_files(predictor, paths: list[str], out_dir: str | Path, target_class: str | None = None,
                  batch_size: int = 16, xray_check: bool = True) -> list[dict]:
    """Write `<stem>_gradcam.png` per readable image and `explain.csv`; returns one row per input file, whose
    `status` is predict's: "ok", "not_xray" (fails predict's radiograph check, `xray_check`: no map, as no
    prediction) or "error" (unreadable); `error` says why there is no map, and a warning names each such file."""
    import pandas as pd
    from PIL import Image

    from .predict import expand_paths

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "explain.csv"
    if table.exists():  # a previous run's table must not describe this run's maps if this one is stopped
        log.info("replacing %s of an earlier run", table)
        table.unlink()
    names = predictor.class_names
    target = _class_index(names, target_class)
    rows, used = [], set()
    files = expand_paths(paths)
    for start in range(0, len(files), batch_size):
        decoded = [(p, *_read_checked(p, xray_check)) for p in files[start:start + batch_size]]
        good = [img for _, img, problem in decoded if problem is None]
        explained = iter(zip(*explain_arrays(predictor, good, target, batch_size, at_image_size=False))) if good \
            else iter(())
        for path, img, problem in decoded:  # rows stay in input order
            if problem is not None:  # unreadable, or not an X-ray as predict would say
                rows.append({"path": printable_path(path), "status": problem["status"],
                             "error": problem.get("error") or problem.get("message")})
                continue
            cam, cls, prob = next(explained)
            png = out_dir / _unique_name(path, used)
            rgb = Image.fromarray(overlay(img, cam))
            write_atomically(png, lambda tmp: rgb.save(tmp, format="PNG"))  # a stopped run leaves no half a map
            rows.append({"path": printable_path(path), "status": "ok", "heatmap": printable_path(png.name),
                         "explained_class": names[cls], "probability": round(float(prob[cls]), 6), "error": ""})
    columns = ["path", "heatmap", "explained_class", "probability", "error"]  # `status` stays out: the CSV is as before
    write_atomically(table, lambda tmp: pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False))
    log.info("explained %d of %d images into %s", sum(1 for r in rows if not r["error"]), len(rows), out_dir)
    _warn_unexplained(rows, table)
    return rows


MAX_LISTED = 20  # files named one per warning line; the rest are counted (all are in explain.csv)


def _warn_unexplained(rows: list[dict], table: Path) -> None:
    """A warning per input without a map, naming it and the reason (predict's rows say the same on stdout)."""
    missing = [r for r in rows if r["error"]]
    for row in missing[:MAX_LISTED]:
        log.warning("%s: no heatmap: %s", row["path"], row["error"])
    if len(missing) > MAX_LISTED:
        log.warning("... and %d more inputs without a heatmap; every reason is in %s", len(missing) - MAX_LISTED,
                    table)


def _class_index(names: list[str], target: str | None) -> int | None:
    if target is None:
        return None
    if target in names:
        return names.index(target)
    raise BonefracError(f"class '{target}' is not one of the model's classes {names}")


def _unique_name(path: Path, used: set) -> str:
    """`<stem>_gradcam.png`; when two inputs (from different folders) share a stem, the later one's name carries 8
    hex digits of a hash of its full path (not a counter, which would name another file's map in another run)."""
    name = f"{path.stem}_gradcam.png"
    if name in used:
        digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]
        name = f"{path.stem}_{digest}_gradcam.png"
    used.add(name)
    return name


# ----------------------------------------------------------------------------- does it point at the fracture?

POINTING_TOLERANCE_PX = 15  # as in the pointing game of Zhang et al. (ECCV 2016): a hit within 15 px counts


def pointing_hit(heatmap: np.ndarray, boxes, tolerance: float = POINTING_TOLERANCE_PX) -> bool:
    """True when the heatmap's maximum lies inside any box (x, y, w, h in pixels, x/y = top-left corner)
    grown by `tolerance` pixels on every side. Ties: the first maximum in row-major order."""
    if not np.any(heatmap):  # a flat map localises nothing: its "maximum" at pixel (0, 0) is not a guess
        return False
    row, col = np.unravel_index(int(np.argmax(heatmap)), np.shape(heatmap))
    # Pixel (row, col) covers [col, col + 1) x [row, row + 1); its centre is what is tested.
    px, py = col + 0.5, row + 0.5
    return any(x - tolerance <= px <= x + w + tolerance and y - tolerance <= py <= y + h + tolerance
               for x, y, w, h in boxes)


def box_mask(shape: tuple[int, int], boxes) -> np.ndarray:
    """Boolean (H, W) mask of the pixels whose centres lie inside any box (x, y, w, h; x/y top-left)."""
    rows = np.arange(shape[0])[:, None] + 0.5
    cols = np.arange(shape[1])[None, :] + 0.5
    mask = np.zeros(shape, dtype=bool)
    for x, y, w, h in boxes:
        mask |= (cols >= x) & (cols < x + w) & (rows >= y) & (rows < y + h)
    return mask


def energy_inside(heatmap: np.ndarray, boxes) -> float:
    """Share of the heatmap's total mass inside the boxes (0 for an all-zero heatmap); the energy-based
    pointing game of Score-CAM (Wang et al., CVPR-W 2020)."""
    heat = np.asarray(heatmap, dtype=np.float64)
    total = heat.sum()
    return float(heat[box_mask(heat.shape, boxes)].sum() / total) if total > 0 else 0.0


def centre_gaussian(shape: tuple[int, int], sigma_frac: float = 0.25) -> np.ndarray:
    """The baseline 'explanation' that ignores the image: a Gaussian at the centre, sigma a fraction of each
    side, peak 1. Radiographs are usually framed around the region of interest, so this is a fair bar."""
    h, w = shape
    ys = (np.arange(h) + 0.5 - h / 2) / (sigma_frac * h)
    xs = (np.arange(w) + 0.5 - w / 2) / (sigma_frac * w)
    return np.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2)).astype(np.float32)
