"""Grad-CAM: shapes and ranges on several timm families, batching, the hook fallback, localisation of a
synthetic blob by a tiny trained CNN, and the pointing-game scores against hand-computed values."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from bonefrac.errors import BonefracError
from bonefrac.explain import (box_mask, centre_gaussian, energy_inside, find_target_layer, gradcam, overlay,
                              pointing_hit)
from bonefrac.models import create
from bonefrac.predict import Ensemble, Predictor


def _predictor(model, size=64, channels=3, threshold=None):
    meta = {"arch": "test", "class_names": ["no_fracture", "fracture"], "positive_index": 1,
            "threshold": threshold, "temperature": 1.0,
            "preprocess": {"size": size, "mean": [0.5] * channels, "std": [0.5] * channels, "channels": channels}}
    return Predictor(model.eval(), meta, torch.device("cpu"))


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (90, 70), dtype=np.uint8), rng.integers(0, 256, (64, 128), dtype=np.uint8),
            rng.integers(0, 256, (50, 50), dtype=np.uint8)]


def _check_heatmaps(heatmaps, images):
    assert len(heatmaps) == len(images)
    for h, img in zip(heatmaps, images):
        assert h.shape == img.shape and h.dtype == np.float32
        assert np.isfinite(h).all() and h.min() >= 0.0 and h.max() <= 1.0
        # min-max scaled at the model's resolution (stretching can leave the minimum a rounding error above 0)
        assert (h.min() == pytest.approx(0.0, abs=1e-6) and h.max() == pytest.approx(1.0)) or h.max() == 0.0


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "convnextv2_atto", "convnextv2_nano", "resnet18",
                                  "tf_efficientnetv2_s"])
def test_gradcam_on_timm_families(arch):
    torch.manual_seed(0)
    predictor = _predictor(create(arch, 2, 3))
    images = _images()
    heatmaps = gradcam(predictor, images)
    _check_heatmaps(heatmaps, images)
    assert any(h.max() > 0 for h in heatmaps)
    _check_heatmaps(gradcam(predictor, images, target_class=0), images)
    rgb = overlay(images[0], heatmaps[0])
    assert rgb.shape == (*images[0].shape, 3) and rgb.dtype == np.uint8


def test_batching_and_ensemble_use_the_same_computation():
    torch.manual_seed(0)
    predictor = _predictor(create("resnet18", 2, 3))
    images = _images(1)
    whole = gradcam(predictor, images, target_class=1)
    one_by_one = gradcam(predictor, images, target_class=1, batch_size=1)
    for a, b in zip(whole, one_by_one):
        np.testing.assert_allclose(a, b, atol=1e-4)
    twice = Ensemble([predictor, predictor], weights=[0.3, 0.7])  # one model twice: its own map
    for a, b in zip(whole, gradcam(twice, images, target_class=1)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.raises(BonefracError):
        gradcam(predictor, images, target_class=5)


def test_an_ensemble_explains_the_class_it_predicts_itself():
    from bonefrac.explain import explain_arrays
    from bonefrac.predict import decide

    torch.manual_seed(0)
    members = [_predictor(create("resnet18", 2, 3)), _predictor(create("resnet18", 2, 3))]
    images = _images(2) + _images(3)
    probs = Ensemble(members).predict_arrays(images)
    # A threshold between the ensemble's probabilities, so that it decides differently for some images than
    # its first member does at that member's own (0.5) threshold.
    threshold = float(np.median(probs[:, 1]))
    ensemble = Ensemble(members, threshold=threshold)
    _, classes, returned = explain_arrays(ensemble, images)
    np.testing.assert_array_equal(classes, decide(probs, 1, threshold))
    np.testing.assert_allclose(returned, probs, atol=1e-6)  # the ensemble's probabilities, not the member's
    _, fixed, _ = explain_arrays(ensemble, images, target_class=0)
    assert (fixed == 0).all()


def test_hook_fallback_for_a_plain_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert find_target_layer(model, torch.zeros(1, 1, 32, 32)) is model[3]  # the last 4-D map before pooling
    images = _images(2)
    _check_heatmaps(gradcam(_predictor(model, size=32, channels=1), images), images)


def test_a_stage_collapsed_to_one_pixel_is_named_in_a_warning(caplog):
    """At a small input size the last stage's map can be 1 x 1: the map then comes from an earlier layer, silently
    (a torchvision ResNet-18 at 32 px used layer3). Global pooling's 1 x 1 output is no reason to warn."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=4, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with caplog.at_level("INFO", logger="bonefrac"):
        assert find_target_layer(model, torch.zeros(1, 1, 16, 16)) is model[3]
        assert "too small to localise" not in caplog.text and "Grad-CAM layer" in caplog.text
        assert find_target_layer(model, torch.zeros(1, 1, 4, 4)) is model[1]  # model[2] and [3] give 1 x 1
    assert "Grad-CAM uses 1" in caplog.text and "too small to localise" in caplog.text


class _TinyCnn(nn.Module):
    """timm's interface in miniature: 4-D features at 1/4 resolution, global average pooling head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 2)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, feats):
        return self.fc(feats.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _blobs(n, rng, size=64):
    """Noise images; every second one (class 1) has a bright blob (sigma 3 px) at a random place."""
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels, centres = [], [], []
    for i in range(n):
        img = rng.normal(60, 20, (size, size))
        centre = rng.integers(10, size - 10, 2)
        if i % 2:
            img += 150 * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 18.0)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        labels.append(i % 2)
        centres.append(centre)
    return images, np.array(labels), np.array(centres)


def test_gradcam_localises_a_blob_the_model_learned():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = _TinyCnn()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(80):
        images, labels, _ = _blobs(32, rng)
        x = (torch.from_numpy(np.stack(images)).float()[:, None] / 255 - 0.5) / 0.5
        loss = nn.functional.cross_entropy(model(x), torch.from_numpy(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    predictor = _predictor(model, size=64, channels=1, threshold=0.5)
    images, labels, centres = _blobs(40, np.random.default_rng(1))
    blob = np.flatnonzero(labels == 1)
    heatmaps = gradcam(predictor, [images[i] for i in blob], target_class=1)
    peaks = np.array([np.unravel_index(h.argmax(), h.shape) for h in heatmaps])
    distance = np.hypot(*(peaks - centres[blob]).T)
    assert np.mean(distance <= 8) >= 0.8, distance.round(1)


def test_pointing_game_scores_by_hand():
    heat = np.zeros((100, 200), np.float32)
    heat[50, 120] = 1.0  # pixel centre (120.5, 50.5)
    assert pointing_hit(heat, [(100, 40, 30, 20)])             # inside x 100..130, y 40..60
    assert not pointing_hit(heat, [(0, 0, 10, 10)])
    assert pointing_hit(heat, [(130, 40, 10, 10)], tolerance=15)    # 9.5 px left of the box
    assert not pointing_hit(heat, [(130, 40, 10, 10)], tolerance=5)
    assert pointing_hit(heat, [(0, 0, 10, 10), (110, 45, 20, 10)])  # any box
    assert not pointing_hit(np.zeros_like(heat), [(0, 0, 10, 10)])  # a flat map points nowhere, not at (0, 0)
    mask = box_mask((4, 6), [(1, 1, 2, 2), (4.6, 0, 1, 1)])
    assert mask.sum() == 5 and mask[1:3, 1:3].all() and mask[0, 5]  # x 4.6..5.6 holds the centre 5.5 only
    flat = np.ones((10, 10))
    assert energy_inside(flat, [(0, 0, 5, 10)]) == pytest.approx(0.5)
    ramp = np.tile(np.arange(10.0), (10, 1))                        # column j has weight j; total 450
    assert energy_inside(ramp, [(8, 0, 2, 10)]) == pytest.approx((8 + 9) * 10 / 450)
    assert energy_inside(np.zeros((5, 5)), [(0, 0, 5, 5)]) == 0.0
    g = centre_gaussian((41, 81))
    assert g.shape == (41, 81) and np.unravel_index(g.argmax(), g.shape) == (20, 40) and g.max() <= 1.0
    assert g[20, 40 + 20] == pytest.approx(np.exp(-0.5 * (20 / (0.25 * 81)) ** 2), rel=1e-3)


def test_swin_features_are_explained_channels_first_and_vit_is_refused():
    import timm

    from bonefrac.explain import _features_and_logits

    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=2, img_size=56,
                             embed_dim=24, depths=(1, 1), num_heads=(1, 2), window_size=7).eval()
    inp = torch.randn(2, 3, 56, 56)
    feats, logits = _features_and_logits(swin, inp)
    # was the NHWC tensor read as (B, C, h, w): a "heatmap" over channels
    assert feats.shape == (2, swin.num_features, 7, 7)
    with torch.no_grad():
        assert torch.allclose(logits, swin(inp), atol=1e-5)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=32, depth=1).eval()
    with pytest.raises(BonefracError, match="tokens"):  # was: an attention tensor explained as a feature map
        _features_and_logits(vit, torch.randn(1, 3, 32, 32))


def test_explain_decides_in_the_forward_precision_predict_uses_and_draws_in_float32(monkeypatch):
    """On CUDA predict runs under bf16 autocast; explain once ran float32 and could explain (and report) another
    class than predict's near the threshold. Here autocast is switched on for the CPU, as it is for CUDA."""
    from bonefrac import predict as predict_mod
    from bonefrac.explain import explain_arrays
    from bonefrac.predict import decide

    torch.manual_seed(0)
    predictor = _predictor(_TinyCnn(), size=64, channels=1)
    images = _images(4) + _images(5)
    fp32 = predictor.predict_arrays(images)[:, 1]
    maps32 = gradcam(predictor, images, target_class=1)
    monkeypatch.setattr(predict_mod, "uses_autocast", lambda device, amp=True: amp)  # bf16 on the CPU too
    predicted = predictor.predict_arrays(images)
    worst = int(np.argmax(np.abs(predicted[:, 1] - fp32)))
    assert predicted[worst, 1] != fp32[worst]  # else this test could not tell the precisions apart
    # A threshold between the two precisions' scores of one image: they decide that image differently.
    predictor.threshold = float((predicted[worst, 1] + fp32[worst]) / 2)
    _, classes, probs = explain_arrays(predictor, images)
    np.testing.assert_allclose(probs, predicted, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(classes, decide(predicted, 1, predictor.threshold))
    for a, b in zip(gradcam(predictor, images, target_class=1), maps32):  # the map does not depend on it
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_an_ensemble_runs_each_member_once_per_batch():
    """Each member's Grad-CAM forward also gives its share of the ensemble's probabilities; the map is all of
    theirs."""
    from bonefrac.explain import explain_arrays
    from bonefrac.predict import decide

    torch.manual_seed(0)
    members = [_predictor(_TinyCnn(), size=64, channels=1) for _ in range(2)]
    images = _images(6)
    expected = Ensemble(members).predict_arrays(images)
    threshold = float(np.median(expected[:, 1]))
    ensemble = Ensemble(members, weights=[0.7, 0.3], threshold=threshold)
    expected = ensemble.predict_arrays(images)
    decided = decide(expected, 1, threshold)
    alone = [explain_arrays(m, images, target_class=decided, at_image_size=False)[0] for m in members]
    calls = [0, 0]
    for i, m in enumerate(members):
        m.model.body.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    heatmaps, classes, probs = explain_arrays(ensemble, images, at_image_size=False)
    assert calls == [1, 1]  # was [2, 1]: the first member ran for the ensemble's probabilities and for the map
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(classes, decide(expected, 1, threshold))
    for i, h in enumerate(heatmaps):  # the members' maps, weighted like their probabilities (was the first's alone)
        mixed = 0.7 * alone[0][i] + 0.3 * alone[1][i]
        np.testing.assert_allclose(h, (mixed - mixed.min()) / (mixed.max() - mixed.min()), atol=1e-5)
        assert not np.allclose(h, alone[0][i], atol=1e-3)


@pytest.mark.parametrize("make", [_TinyCnn, lambda: create("resnet18", 2, 1)], ids=["tiny_cnn", "resnet18"])
def test_tta_on_the_cpu_reuses_the_float32_forward_and_reports_predicts_probabilities(make):
    """Without autocast the two Grad-CAM forwards' logits (unflipped, flipped) are predict's own: 2 forwards per
    batch (was 3: the Grad-CAM one, then predict's unflipped and flipped ones again), and the map averages both."""
    from bonefrac.explain import explain_arrays
    from bonefrac.predict import decide

    torch.manual_seed(0)
    predictor = _predictor(make(), size=64, channels=1)
    images = _images(7) + _images(8)  # 6 images: 2 batches of 4 and 2
    plain = predictor.predict_arrays(images)
    maps = gradcam(predictor, images, target_class=1)
    predictor.tta = True
    expected = predictor.predict_arrays(images)
    assert not np.array_equal(expected, plain)  # else this test could not tell whether the flip was averaged in
    predictor.threshold = float(np.median(expected[:, 1]))
    calls = []
    first = next(m for m in predictor.model.modules() if isinstance(m, nn.Conv2d))  # runs once per network pass
    first.register_forward_hook(lambda *_: calls.append(1))
    heatmaps, classes, probs = explain_arrays(predictor, images, batch_size=4)
    assert len(calls) == 2 * 2
    np.testing.assert_array_equal(probs, expected)  # bit for bit: the same average of the same float32 logits
    np.testing.assert_array_equal(classes, decide(expected, 1, predictor.threshold))
    # Both views' maps are averaged (was: the unflipped view's alone, though predict averages both views): so the
    # map of a mirrored image is the mirror of the image's map, which no single view's map is.
    tta_maps = gradcam(predictor, images, target_class=1)
    mirrored = gradcam(predictor, [np.ascontiguousarray(img[:, ::-1]) for img in images], target_class=1)
    for a, b in zip(tta_maps, mirrored):
        np.testing.assert_allclose(a, b[:, ::-1], atol=1e-4)
    assert any(not np.allclose(a, one_view, atol=1e-3) for a, one_view in zip(tta_maps, maps))
    assert any(not np.allclose(a, b[:, ::-1], atol=1e-3) for a, b in zip(maps, gradcam(  # no one-view map is
        _predictor(predictor.model, size=64, channels=1), [np.ascontiguousarray(i[:, ::-1]) for i in images], 1)))


def test_an_ensemble_of_members_at_other_input_sizes_mixes_their_maps_at_the_largest():
    from bonefrac.explain import explain_arrays

    torch.manual_seed(0)
    members = [_predictor(_TinyCnn(), size=48, channels=1), _predictor(_TinyCnn(), size=64, channels=1)]
    maps, _, _ = explain_arrays(Ensemble(members), _images(2), target_class=1, at_image_size=False)
    assert all(m.shape == (64, 64) and m.min() >= 0 and m.max() == pytest.approx(1.0) for m in maps)
    full = gradcam(Ensemble(members), _images(2), target_class=1)
    assert [m.shape for m in full] == [img.shape for img in _images(2)]


def test_an_ensemble_with_a_token_model_member_is_explained_by_the_others(caplog):
    """A ViT member (no spatial map) made the whole ensemble unexplainable; its probabilities still count."""
    import timm

    from bonefrac.explain import explain_arrays

    torch.manual_seed(0)
    cnn = _predictor(create("resnet18", 2, 3), size=32)
    vit = _predictor(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=32,
                                       depth=1), size=32)
    ensemble = Ensemble([cnn, vit], weights=[0.5, 0.5])
    maps, _, probs = explain_arrays(ensemble, _images(), target_class=1, at_image_size=False)
    alone, _, _ = explain_arrays(cnn, _images(), target_class=1, at_image_size=False)
    for a, b in zip(maps, alone):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(probs, ensemble.predict_arrays(_images()), atol=1e-6)
    assert "has no map to explain" in caplog.text
    with pytest.raises(BonefracError, match="no member of this ensemble has a spatial feature map"):
        explain_arrays(Ensemble([vit, vit]), _images())
