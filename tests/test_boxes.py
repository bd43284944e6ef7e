"""Box supervision: lesion masks from a boxes CSV, masks moved with the augmentation, the loss, and training."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bonefrac import checkpoint
from bonefrac.cli import main
from bonefrac.config import AugmentConfig
from bonefrac.sources import box_masks
from bonefrac.errors import BonefracError
from bonefrac.manifest import load_manifest
from bonefrac.trainutil import lesion_loss
from bonefrac.transforms import augment
from conftest import interrupt_second_epoch

ROOT = Path(__file__).resolve().parents[1]
BOXES = ROOT / "data" / "sample" / "boxes.csv"
NO_BOXES = ["--config", str(ROOT / "configs" / "demo.yaml"), "--set", "train.epochs=2", "--set", "data.size=64",
            "--set", "train.watchdog_s=0", "--set", "train.box_loss=1.0"]
FAST = [*NO_BOXES, "--set", f"data.boxes={BOXES}"]
STILL = AugmentConfig(rotate_deg=0.0, hflip_p=0.0, brightness=0.0, contrast=0.0, scale=(1.0, 1.0), translate=0.0,
                      shear_deg=0.0, blur_p=0.0)


def _rows(sample_manifest) -> pd.DataFrame:
    return load_manifest(sample_manifest)


def test_masks_cover_the_boxes_and_know_which_images_they_describe(sample_manifest):
    rows = _rows(sample_manifest)
    masks, known = box_masks(rows, BOXES, 100, negative_label="no_fracture")
    boxes = pd.read_csv(BOXES)
    with_boxes = {Path(p).name for p in boxes.image}
    names = rows.path.map(lambda p: Path(p).name)
    for i, row in rows.iterrows():
        has = names[i] in with_boxes
        assert known[i] == (1.0 if has or row.label == "no_fracture" else 0.0), row.path
        assert (masks[i].max() == 1) == has, row.path
    # One box by hand: x, y, w, h in image pixels -> the image stretched to 100 x 100.
    first = boxes.iloc[0]
    i = int(np.flatnonzero(names == Path(first.image).name)[0])
    sx, sy = 100 / rows.width[i], 100 / rows.height[i]
    cx, cy = int((first.x + first.w / 2) * sx), int((first.y + first.h / 2) * sy)
    assert masks[i, cy, cx] == 1 and masks[i, 0, 0] == 0


def test_bad_boxes_csv_names_the_file_and_the_problem(sample_manifest, tmp_path):
    rows = _rows(sample_manifest)
    bad = tmp_path / "boxes.csv"
    bad.write_text("image,x,y\nimages/a.webp,1,2\n")
    with pytest.raises(BonefracError, match="lacks column.*h, w"):
        box_masks(rows, bad, 32, None)
    bad.write_text("image,x,y,w,h\nimages/not_in_manifest.webp,1,2,3,4\n")
    with pytest.raises(BonefracError, match="no box matches"):
        box_masks(rows, bad, 32, None)


def test_masks_follow_the_image_and_leave_the_views_unchanged():
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    x = torch.randint(0, 256, (4, 1, 40, 40), dtype=torch.uint8)
    masks = torch.zeros(4, 1, 20, 20, dtype=torch.uint8)
    masks[:, :, 4:8, 2:6] = 1
    acfg = AugmentConfig()
    plain = augment(x, 32, acfg, gen())
    views, moved = augment(x, 32, acfg, gen(), masks)
    assert torch.equal(plain, views)  # the same random draws with or without masks
    assert moved.shape == (4, 1, 20, 20) and 0 <= moved.min() and moved.max() <= 1
    _, still = augment(x, 32, STILL, gen(), masks)
    assert torch.allclose(still, masks.float(), atol=1e-5)
    _, flipped = augment(x, 32, replace(STILL, hflip_p=1.0), gen(), masks)
    assert torch.allclose(flipped, masks.float().flip(-1), atol=1e-5)


def test_lesion_loss_by_hand():
    logits = torch.zeros(2, 1, 2, 2)  # BCE of logit 0 is log 2 for either target
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, 0, :2, :2] = 1  # image 0: one positive cell of four
    log2 = float(np.log(2.0))
    assert lesion_loss(logits, masks, torch.tensor([1.0, 1.0])).item() == pytest.approx(log2)
    logits[0, 0, 0, 0] = 2.0  # positive cell now costs log(1 + e^-2)
    pos = float(np.log1p(np.exp(-2.0)))
    expected = (0.5 * (pos + log2) + log2) / 2
    assert lesion_loss(logits, masks, torch.tensor([1.0, 1.0])).item() == pytest.approx(expected, rel=1e-5)
    # An image whose mask is unknown (weight 0) does not count.
    assert lesion_loss(logits, masks, torch.tensor([0.0, 1.0])).item() == pytest.approx(log2)


def test_box_supervised_training_saves_a_plain_classifier_and_resumes(sample_manifest, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert main(["train", "--manifest", str(sample_manifest), "--out", str(straight), *FAST]) == 0
    model, meta = checkpoint.load(straight / "best")
    assert not any("box_head" in k for k in model.state_dict())
    assert meta["config"]["train"]["box_loss"] == 1.0
    assert checkpoint.load_train_state(straight / "last")["box_head"]

    killed = tmp_path / "killed"
    undo = interrupt_second_epoch(monkeypatch)
    assert main(["train", "--manifest", str(sample_manifest), "--out", str(killed), *FAST]) == 130
    undo()
    assert main(["train", "--manifest", str(sample_manifest), "--out", str(killed), "--resume", *FAST]) == 0
    a, _ = checkpoint.load(straight / "last")
    b, _ = checkpoint.load(killed / "last")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert np.allclose(x.numpy(), y.numpy(), atol=1e-6), name


def test_box_loss_without_boxes_is_a_clear_error(sample_manifest, tmp_path, caplog):
    assert main(["train", "--manifest", str(sample_manifest), "--out", str(tmp_path / "r"), *NO_BOXES]) != 0
    assert "data.boxes" in caplog.text


def test_boxes_outside_the_image_are_clipped_or_ignored_and_blank_cells_are_named(sample_manifest, tmp_path):
    rows = _rows(sample_manifest)
    name = Path(pd.read_csv(BOXES).image.iloc[0])
    i = int(np.flatnonzero(rows.path.map(lambda p: Path(p).name) == name.name)[0])
    w, h = rows.width[i], rows.height[i]
    csv = tmp_path / "boxes.csv"
    image = (BOXES.parent / name).resolve()
    # wholly left of the image (a negative end index once filled a band across it), and one poking out below
    csv.write_text(f"image,x,y,w,h\n{image},{-w},{h / 2},{w / 5},{h / 10}\n{image},{w / 2},{h * 0.9},{w / 10},{h}\n")
    masks, known = box_masks(rows, csv, 100, negative_label=None)
    assert known[i] == 1.0
    ys, xs = np.nonzero(masks[i])
    assert xs.min() >= 50 and ys.min() >= 90 and ys.max() == 99  # only the clipped second box
    csv.write_text(f"image,x,y,w,h\n{image},{-w},{h / 2},{w / 5},{h / 10}\n")
    masks, known = box_masks(rows, csv, 100, negative_label=None)
    assert masks[i].max() == 0 and known[i] == 0.0  # nothing left of it: not evidence of "nothing here"
    csv.write_text(f"image,x,y,w,h\n{image},1,2,3,4\n{image},,2,3,4\n")
    with pytest.raises(BonefracError, match="missing or non-numeric.*data row 2"):
        box_masks(rows, csv, 100, negative_label=None)
    csv.write_text(f"image,x,y,w,h\n{image},1,2,0,4\n")
    with pytest.raises(BonefracError, match="width/height <= 0"):
        box_masks(rows, csv, 100, negative_label=None)
