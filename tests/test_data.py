"""Datasets of the reference trainer: the three on-disk layouts (fake trees), the embedded brain
default, the procedural set, and the augmentation keeping image and label aligned."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from skd_train.data import MEAN, STD, build_dataset
from skd_train.data.transforms import SegTransform, resize_bilinear, resize_nearest

PIL = pytest.importorskip("PIL.Image", reason="Pillow is needed to write the fake dataset trees")
PALETTE = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10], [10, 250, 250]], np.uint8)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(array).save(path)


def _random_image(rng, h=24, w=32):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _unnormalise(image: torch.Tensor) -> np.ndarray:
    """(3, h, w) normalised -> float (h, w, 3) in 0..255."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return ((image * std + mean) * 255).permute(1, 2, 0).numpy()


def _whole(name, root, split="train"):
    return build_dataset(name, root=root, split=split, crop_size=None, augment=False)


# ---- Cityscapes ------------------------------------------------------------------------------------

def _cityscapes_tree(root, rng, split="train"):
    stored = np.array([[7, 8, 26, 33], [0, 1, 24, 255], [23, 21, 11, 6]], np.uint8)  # label ids
    stored = np.kron(stored, np.ones((8, 8), np.uint8))  # (24, 32)
    images = {}
    for city, frame in (("aachen", "000000_000019"), ("bonn", "000001_000019"), ("bonn", "000002_000019")):
        image = _random_image(rng)
        _save(root / "leftImg8bit" / split / city / f"{city}_{frame}_leftImg8bit.png", image)
        _save(root / "gtFine" / split / city / f"{city}_{frame}_gtFine_labelIds.png", stored)
        images[f"{city}_{frame}"] = image
    return images, stored


def test_cityscapes_maps_label_ids_to_19_train_ids(tmp_path):
    images, stored = _cityscapes_tree(tmp_path, np.random.default_rng(0))
    ds = _whole("cityscapes", tmp_path)
    assert len(ds) == 3 and ds.num_classes == 19 and len(ds.class_names) == 19 and ds.ignore_index == 255
    image, label = ds[0]  # sorted: aachen first
    assert image.dtype == torch.float32 and image.shape == (3, 24, 32)
    assert label.dtype == torch.int64 and label.shape == (24, 32)
    expected = np.array([[0, 1, 13, 18], [255, 255, 11, 255], [10, 8, 2, 255]])
    assert np.array_equal(label.numpy(), np.kron(expected, np.ones((8, 8), int)))
    assert np.allclose(_unnormalise(image), images["aachen_000000_000019"], atol=1e-3)


def test_cityscapes_errors_name_the_missing_folder_and_file(tmp_path):
    _cityscapes_tree(tmp_path, np.random.default_rng(0))
    with pytest.raises(FileNotFoundError, match=r"gtFine[/\\]val"):
        (tmp_path / "leftImg8bit" / "val").mkdir()
        _whole("cityscapes", tmp_path, split="val")
    (tmp_path / "gtFine" / "train" / "bonn" / "bonn_000002_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="bonn_000002_000019_gtFine_labelIds.png"):
        _whole("cityscapes", tmp_path)
    with pytest.raises(ValueError, match="root"):
        build_dataset("cityscapes")


# ---- CamVid ----------------------------------------------------------------------------------------

def test_camvid_keeps_11_classes_and_ignores_void(tmp_path):
    rng = np.random.default_rng(1)
    stored = np.kron(np.arange(12, dtype=np.uint8).reshape(3, 4), np.ones((8, 8), np.uint8))
    for split in ("train", "test"):
        for i in range(2):
            _save(tmp_path / split / f"0001TP_{i:06d}.png", _random_image(rng))
            _save(tmp_path / f"{split}annot" / f"0001TP_{i:06d}.png", stored)
    ds = _whole("camvid", tmp_path, split="test")
    assert len(ds) == 2 and ds.num_classes == 11 and len(ds.class_names) == 11
    _, label = ds[1]
    expected = np.where(stored == 11, 255, stored)
    assert np.array_equal(label.numpy(), expected)
    with pytest.raises(FileNotFoundError, match="valannot|val"):
        _whole("camvid", tmp_path, split="val")


# ---- ADE20K ----------------------------------------------------------------------------------------

def test_ade20k_shifts_labels_and_ignores_other(tmp_path):
    rng = np.random.default_rng(2)
    base = tmp_path / "ADEChallengeData2016"
    stored = np.kron(np.array([[0, 1, 2, 150]], np.uint8), np.ones((24, 8), np.uint8))
    _save(base / "images" / "validation" / "ADE_val_00000001.jpg", _random_image(rng))
    _save(base / "annotations" / "validation" / "ADE_val_00000001.png", stored)
    for root in (tmp_path, base):  # the folder above ADEChallengeData2016 works too
        ds = _whole("ade20k", root, split="val")
        image, label = ds[0]
        assert ds.num_classes == 150 and len(set(ds.class_names)) == 150
        assert image.shape == (3, 24, 32)
        assert np.array_equal(np.unique(label.numpy()[:, :8]), [255])
        assert np.array_equal(label.numpy()[0, ::8], [255, 0, 1, 149])
    with pytest.raises(FileNotFoundError, match=r"annotations[/\\]training"):
        (base / "images" / "training").mkdir()
        _whole("ade20k", tmp_path, split="train")


def test_unknown_dataset_and_split_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'voc'"):
        build_dataset("voc")
    with pytest.raises(ValueError, match="split"):
        build_dataset("procedural", split="holdout")
    with pytest.raises(ValueError, match="seed"):
        build_dataset("procedural", seed=-1)
    with pytest.raises(ValueError, match="crop_size"):
        build_dataset("procedural", crop_size=(0, 8))


# ---- The augmentation ------------------------------------------------------------------------------

def _blocky_sample(rng, size=64, block=8):
    label = np.kron(rng.integers(0, len(PALETTE), (size // block, size // block)), np.ones((block, block), int))
    return PALETTE[label], label


def _decode(image: torch.Tensor) -> np.ndarray:
    """The palette index nearest to each pixel's colour."""
    rgb = _unnormalise(image)
    return np.argmin(((rgb[:, :, None, :] - PALETTE[None, None].astype(np.float32)) ** 2).sum(-1), axis=-1)


def test_augmentation_keeps_image_and_label_aligned():
    rng = np.random.default_rng(3)
    transform = SegTransform(crop_size=(48, 56), augment=True, scale_range=(0.5, 2.0))
    agree = total = padded = 0
    for trial in range(40):
        image, label = _blocky_sample(rng)
        out_image, out_label = transform(image, label, np.random.default_rng(trial))
        assert out_image.shape == (3, 48, 56) and out_label.shape == (48, 56)
        valid = out_label.numpy() != 255
        agree += (_decode(out_image)[valid] == out_label.numpy()[valid]).sum()
        total += valid.sum()
        # Padding: ignore in the label, the mean (0 after normalisation) in the image.
        pad = ~valid
        padded += pad.sum()
        assert torch.all(out_image[:, torch.from_numpy(pad)] == 0)
    assert padded > 0  # scales below 0.75 must have needed padding
    assert agree / total > 0.97  # only bilinear blur at block edges may disagree


def _resize_pad_crop_flip(image, label, rng, crop, scale_range):
    """The augmentation done the plain way: resize everything, normalise, pad, crop, flip."""
    scale = rng.uniform(*scale_range)
    size = (max(1, round(label.shape[0] * scale)), max(1, round(label.shape[1] * scale)))
    img = (resize_bilinear(image.astype(np.float32) / 255, size) - np.array(MEAN)) / np.array(STD)
    lab = resize_nearest(label, size)
    pad = (max(crop[0] - size[0], 0), max(crop[1] - size[1], 0))
    img = np.pad(img, ((0, pad[0]), (0, pad[1]), (0, 0)))
    lab = np.pad(lab, ((0, pad[0]), (0, pad[1])), constant_values=255)
    top = int(rng.integers(0, lab.shape[0] - crop[0] + 1))
    left = int(rng.integers(0, lab.shape[1] - crop[1] + 1))
    img, lab = img[top:top + crop[0], left:left + crop[1]], lab[top:top + crop[0], left:left + crop[1]]
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    return img.transpose(2, 0, 1), lab


def test_cropping_before_resampling_equals_the_plain_pipeline():
    rng = np.random.default_rng(7)
    transform = SegTransform(crop_size=(40, 52), augment=True, scale_range=(0.4, 2.5))
    for trial in range(30):
        image, label = _random_image(rng, 37, 61), rng.integers(0, 30, (37, 61))
        got_image, got_label = transform(image, label, np.random.default_rng(trial))
        want_image, want_label = _resize_pad_crop_flip(image, label, np.random.default_rng(trial), (40, 52),
                                                       (0.4, 2.5))
        assert np.array_equal(got_label.numpy(), want_label)
        assert np.allclose(got_image.numpy(), want_image, atol=1e-4)


@pytest.mark.parametrize("src, dst", [((23, 19), (29, 24)), ((23, 19), (11, 9)), ((5, 7), (13, 25))])
def test_numpy_resizing_matches_torch_interpolate(src, dst):
    rng = np.random.default_rng(6)
    image, label = rng.normal(size=(*src, 3)).astype(np.float32), rng.integers(0, 20, src)
    expected = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=dst,
                                               mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    # torch forms the source coordinate in float32 too, rounded slightly differently: ~1e-5.
    assert np.allclose(resize_bilinear(image, dst), expected.numpy(), atol=2e-4)
    expected_label = torch.nn.functional.interpolate(torch.from_numpy(label)[None, None].float(), size=dst,
                                                     mode="nearest-exact")[0, 0].long()
    assert np.array_equal(resize_nearest(label, dst), expected_label.numpy())


def test_flip_and_unit_scale_move_image_and_label_together():
    image, label = _blocky_sample(np.random.default_rng(4))
    transform = SegTransform(crop_size=None, augment=True, scale_range=(1.0, 1.0))
    flips = set()
    for trial in range(8):
        out_image, out_label = transform(image, label, np.random.default_rng(trial))
        assert np.array_equal(_decode(out_image), out_label.numpy())
        flips.add(bool(np.array_equal(out_label.numpy(), label[:, ::-1])))
    assert flips == {True, False}


def test_evaluation_transform_centre_crops_without_randomness():
    image, label = _blocky_sample(np.random.default_rng(5))
    transform = SegTransform(crop_size=(32, 40), augment=False)
    a = transform(image, label, np.random.default_rng(0))
    b = transform(image, label, np.random.default_rng(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert np.array_equal(a[1].numpy(), label[16:48, 12:52])


# ---- Procedural ------------------------------------------------------------------------------------

def test_procedural_is_deterministic_by_seed_split_and_epoch():
    a = build_dataset("procedural", crop_size=(48, 48), seed=7)
    b = build_dataset("procedural", crop_size=(48, 48), seed=7)
    assert len(a) == 64 and a.num_classes == 4
    for i in (0, 5):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    other_seed = build_dataset("procedural", crop_size=(48, 48), seed=8)
    val = build_dataset("procedural", split="val", crop_size=(48, 48), seed=7)
    assert not torch.equal(a[0][0], other_seed[0][0]) and not torch.equal(a[0][0], val[0][0])
    first = a[3]
    a.set_epoch(1)
    assert not torch.equal(first[0], a[3][0])  # a fresh augmentation ...
    b.set_epoch(1)
    assert torch.equal(a[3][0], b[3][0])  # ... that is still reproducible
    labels = torch.stack([a[i][1] for i in range(16)])
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3, 255} and {1, 2, 3} <= set(labels.unique().tolist())


def test_datasets_batch_with_the_default_collate():
    ds = build_dataset("procedural", crop_size=(32, 40), num_samples=6)
    assert build_dataset("procedural")[0][0].shape == (3, 64, 64)  # the dataset's default crop
    images, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert images.shape == (3, 3, 32, 40) and labels.shape == (3, 32, 40) and labels.dtype == torch.int64


# ---- Brain (the embedded default) --------------------------------------------------------------------

needs_nilearn = pytest.mark.skipif(
    importlib.util.find_spec("nilearn") is None or importlib.util.find_spec("nibabel") is None,
    reason="the brain dataset reads nilearn's MNI152 template: pip install nilearn==0.14.1 nibabel")


@needs_nilearn
def test_brain_default_is_real_split_by_position_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SKD_TRAIN_CACHE", str(tmp_path))
    train = build_dataset("brain", split="train", crop_size=(160, 144))
    assert (tmp_path / "brain_mni152_2009a_v1.npz").is_file()
    val = build_dataset("brain", split="val", crop_size=None, augment=False)
    everything = build_dataset("brain", split="all", crop_size=None, augment=False)
    assert train.num_classes == 3 and train.class_names[0] == "background"
    assert 120 <= len(everything) <= 150 and len(train) > 3 * len(val) > 0
    # Disjoint, and no train slice within 2 slices of a val slice.
    gaps = np.abs(train.z[:, None] - val.z[None, :])
    assert gaps.min() > 2
    image, label = train[0]
    assert image.shape == (3, 160, 144) and label.shape == (160, 144)
    rgb = _unnormalise(image)  # one grey T1 slice in the three channels
    assert np.allclose(rgb[..., 0], rgb[..., 1], atol=1e-3) and np.allclose(rgb[..., 1], rgb[..., 2], atol=1e-3)
    whole_image, whole_label = val[len(val) // 2]
    assert whole_label.shape == (233, 197)
    freq = np.bincount(whole_label.flatten().numpy(), minlength=3)
    assert np.all(freq[:3] > 0.05 * whole_label.numel())  # a mid-brain slice shows every tissue
    # Grey matter is darker than white matter on T1: the labels follow the intensities.
    t1 = torch.from_numpy(_unnormalise(whole_image)[..., 0])
    assert t1[whole_label == 1].mean() + 20 < t1[whole_label == 2].mean()
    # The cache is reused: a second dataset reads the same slices.
    again = build_dataset("brain", split="val", crop_size=None, augment=False)
    assert np.array_equal(again.labels, val.labels) and np.array_equal(again.images, val.images)


def test_brain_without_nilearn_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util as util

    monkeypatch.setenv("SKD_TRAIN_CACHE", str(tmp_path))  # no cache: the template must be read
    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a))
    with pytest.raises(ImportError, match="pip install nilearn"):
        build_dataset("brain")
