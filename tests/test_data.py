"""Tests for ml.data.images: layouts, balanced reproducible splits, skipping bad files, errors."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ml.data import images as data
from ml.data.images import DataError, load_image, load_selection, load_split, pixel_hash, scan

RNG = np.random.default_rng(1234)


def _save_noise(path: Path, size: tuple[int, int] = (80, 60)) -> None:
    """A random-noise RGB image (unique pixels, so no duplicate-hash skips)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _make_folder(root: Path, counts: dict[str, int]) -> Path:
    """Class folders of 80x60 images, every third a JPEG, plus files that must be ignored."""
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _save_noise(root / cls / f"{cls}_{i:02d}.{'jpg' if i % 3 == 2 else 'png'}")
        (root / cls / "notes.txt").write_text("not an image")
        (root / cls / ".hidden.png").write_bytes(b"hidden junk")
    (root / "manifest.csv").write_text("image_id,class\n")
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _make_folder(tmp_path / "ds", {"a": 8, "b": 8, "c": 8})


def test_folder_scan_counts_ignores_non_images(folder: Path) -> None:
    _save_noise(folder / "b" / "sub" / "deep.png")  # recursive inside a class folder
    cat = scan(folder)
    assert cat.layout == "folder" == data.detect_layout(folder)
    assert cat.classes == ["a", "b", "c"]
    assert cat.counts() == {"a": 8, "b": 9, "c": 8}
    assert all(p.suffix in {".png", ".jpg"} and not p.name.startswith(".") for p in cat.groups)
    assert cat.groups[cat.items["a"][0]] == str(cat.items["a"][0])
    assert cat.items["a"] == sorted(cat.items["a"])


def test_folder_split_balanced_disjoint_uint8(folder: Path) -> None:
    split = load_split(folder, n_per_class=4, n_heldout=3, image_size=16)
    assert split.classes == ["a", "b", "c"] and split.layout == "folder"
    assert split.train.per_class_counts() == {"a": 4, "b": 4, "c": 4}
    assert split.heldout.per_class_counts() == {"a": 3, "b": 3, "c": 3}
    assert len(split.train) == 12 and split.skipped == []
    for s in (split.train, split.heldout):
        assert s.images.dtype == torch.uint8 and s.images.shape[1:] == (3, 16, 16)
        assert s.labels.dtype == torch.int64
        for img, lab, path in zip(s.images, s.labels.tolist(), s.paths, strict=True):
            assert Path(path).parent.name == split.classes[lab]  # label matches folder
            assert torch.equal(img, load_image(Path(path), 16))
    assert not set(split.train.paths) & set(split.heldout.paths)
    assert not set(split.train.hashes) & set(split.heldout.hashes)
    assert split.train.hashes == [pixel_hash(i) for i in split.train.images]


def test_n_per_class_none_takes_the_rest(folder: Path) -> None:
    split = load_split(folder, n_heldout=2, image_size=8)
    assert split.train.per_class_counts() == {"a": 6, "b": 6, "c": 6}


def test_determinism(folder: Path) -> None:
    kw = {"n_per_class": 3, "n_heldout": 2, "image_size": 8}
    one, two = load_split(folder, seed=5, **kw), load_split(folder, seed=5, **kw)
    assert one.train.hashes == two.train.hashes and one.heldout.hashes == two.heldout.hashes
    assert torch.equal(one.train.images, two.train.images)
    other = load_split(folder, seed=6, **kw)
    assert other.train.hashes != one.train.hashes


def test_subset(folder: Path) -> None:
    s = load_split(folder, n_per_class=2, image_size=8).train
    sub = s.subset([0, 5])
    assert len(sub) == 2 and sub.paths == [s.paths[0], s.paths[5]]
    assert torch.equal(sub.images[1], s.images[5]) and sub.classes == s.classes
    assert sub.per_class_counts() == {"a": 1, "b": 0, "c": 1}


@pytest.mark.parametrize("wide", [True, False])
def test_centre_crop(tmp_path: Path, wide: bool) -> None:
    arr = np.zeros((30, 90, 3), dtype=np.uint8)  # margins red, centre square blue
    arr[..., 0] = 255
    arr[:, 30:60] = (0, 0, 255)
    if not wide:
        arr = arr.transpose(1, 0, 2).copy()
    Image.fromarray(arr).save(tmp_path / "x.png")
    img = load_image(tmp_path / "x.png", 12)
    assert img.shape == (3, 12, 12) and img.dtype == torch.uint8
    assert int(img[0].max()) <= 2 and int(img[2].min()) >= 253


def test_load_image_keeps_native_size_exactly(tmp_path: Path) -> None:
    _save_noise(tmp_path / "n.png", (20, 20))
    want = np.asarray(Image.open(tmp_path / "n.png").convert("RGB"))
    assert np.array_equal(load_image(tmp_path / "n.png", 20).permute(1, 2, 0).numpy(), want)


def test_pixel_hash() -> None:
    img = torch.arange(48, dtype=torch.uint8).reshape(3, 4, 4)
    assert pixel_hash(img) == hashlib.sha256(bytes(range(48))).hexdigest()
    assert pixel_hash(img) != pixel_hash(img.flip(0))
    with pytest.raises(DataError, match="uint8"):
        pixel_hash(img.float())


def test_corrupt_file_skipped_and_replaced(folder: Path, caplog) -> None:
    bad = folder / "b" / "b_bad.png"
    bad.write_bytes(b"\x89PNG garbage, not an image")
    (folder / "b" / "empty.jpg").write_bytes(b"")
    caplog.set_level(logging.WARNING, logger="ml.data")
    full = load_split(folder, image_size=8)  # reads everything: both bad files are met
    assert {p for p, _ in full.skipped} == {str(bad), str(folder / "b" / "empty.jpg")}
    assert all(r.startswith("unreadable") for _, r in full.skipped)
    assert str(bad) in caplog.text
    assert full.train.per_class_counts()["b"] == 8
    met = 0
    for seed in range(4):  # with a quota the class is still filled, bad files replaced
        split = load_split(folder, n_per_class=5, n_heldout=3, image_size=8, seed=seed)
        assert split.train.per_class_counts() == {"a": 5, "b": 5, "c": 5}
        assert str(bad) not in split.train.paths + split.heldout.paths
        met += len(split.skipped)
    assert met > 0


def test_duplicate_pixels_skipped(folder: Path) -> None:
    (folder / "a" / "copy.png").write_bytes((folder / "a" / "a_00.png").read_bytes())
    split = load_split(folder, image_size=8)
    assert len(split.skipped) == 1 and "duplicate" in split.skipped[0][1]
    assert len(set(split.train.hashes)) == len(split.train)


@pytest.mark.parametrize(
    ("counts", "kwargs", "match"),
    [
        ({"a": 3}, {}, "at least two classes"),
        ({"a": 3, "b": 3, "c": 0}, {}, "class 'c' has no images"),
        ({"a": 9, "b": 3}, {"n_per_class": 4, "n_heldout": 1}, "class 'b' has 3 images but 5"),
        (
            {"a": 3, "b": 3},
            {"classes": ["a", "zz"]},
            r"unknown classes \['zz'\].*valid: \['a', 'b'\]",
        ),
        ({"a": 3, "b": 3}, {"classes": ["a"]}, "at least two classes"),
        ({"a": 3, "b": 3}, {"n_per_class": 0}, "n_per_class must be"),
        ({"a": 3, "b": 3}, {"n_heldout": -1}, "n_heldout must be"),
        ({"a": 3, "b": 3}, {"image_size": 4}, "image_size must be"),
        ({"a": 3, "b": 3}, {"layout": "coco"}, "unknown layout 'coco'; allowed: auto, folder"),
    ],
)
def test_errors(tmp_path: Path, counts: dict[str, int], kwargs: dict, match: str) -> None:
    root = _make_folder(tmp_path / "ds", counts)
    with pytest.raises(DataError, match=match):
        load_split(root, **kwargs)


def test_too_few_usable_after_corrupt(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "ds", {"a": 4, "b": 4})
    (root / "b" / "b_00.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"class 'b' has 3 usable images of 4 \(1 skipped"):
        load_split(root, n_per_class=4, image_size=8)


def test_missing_root_and_file_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is not a folder"):
        scan(tmp_path / "f.png")


def _make_ham(root: Path) -> dict[str, str]:
    """Fake HAM10000: lesions with 1-3 images, split over two part folders; one row missing."""
    lesions = {"mel": [3, 1, 2, 1, 2, 1], "nv": [1, 1, 2, 3, 1, 1], "df": [2, 2, 1, 1, 1, 1]}
    rows, lesion_of, k = [], {}, 0
    for dx, sizes in lesions.items():
        for j, n in enumerate(sizes):
            for _ in range(n):
                image_id = f"ISIC_{k:07d}"
                part = "HAM10000_images_part_1" if k % 2 else "HAM10000_images_part_2"
                _save_noise(root / part / f"{image_id}.jpg")
                rows.append((f"HAM_{dx}_{j}", image_id, dx))
                lesion_of[image_id] = f"HAM_{dx}_{j}"
                k += 1
    rows.append(("HAM_gone", "ISIC_9999999", "mel"))
    with open(root / "HAM10000_metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["lesion_id", "image_id", "dx", "dx_type", "age"])
        w.writerows([(*r, "histo", "50.0") for r in rows])
    return lesion_of


def test_ham10000_layout_group_aware(tmp_path: Path) -> None:
    lesion_of = _make_ham(tmp_path)
    cat = scan(tmp_path)
    assert cat.layout == "ham10000" and cat.classes == ["df", "mel", "nv"]
    assert cat.counts() == {"df": 8, "mel": 10, "nv": 9}
    assert cat.display_names["mel"] == "melanoma"
    assert {p.stem: g for p, g in cat.groups.items()} == lesion_of
    for seed in range(6):
        split = load_split(tmp_path, n_per_class=4, n_heldout=3, image_size=8, seed=seed)
        assert split.train.per_class_counts() == {"df": 4, "mel": 4, "nv": 4}
        assert split.heldout.per_class_counts() == {"df": 3, "mel": 3, "nv": 3}
        for s in (split.train, split.heldout):  # label comes from dx
            assert all(
                lesion_of[Path(p).stem].split("_")[1] == split.classes[lab]
                for p, lab in zip(s.paths, s.labels.tolist(), strict=True)
            )
        train_l = {lesion_of[Path(p).stem] for p in split.train.paths}
        held_l = {lesion_of[Path(p).stem] for p in split.heldout.paths}
        assert not train_l & held_l
        assert [s for s, _ in split.skipped] == ["ISIC_9999999"]


def _make_matek(root: Path) -> None:
    for abbr, n in {"BLA": 5, "EOS": 4, "LYT": 4, "OTH": 3}.items():
        for i in range(n):
            sub = root / abbr / ("0001-1000" if abbr == "BLA" else "")
            _save_noise(sub / f"{abbr}_{i:05d}.{'tiff' if abbr == 'EOS' else 'jpg'}")


def test_matek_layout(tmp_path: Path, caplog) -> None:
    _make_matek(tmp_path)
    assert data.detect_layout(tmp_path) == "matek"
    caplog.set_level(logging.INFO, logger="ml.data")
    cat = scan(tmp_path)
    assert cat.layout == "matek" and cat.classes == ["BLA", "EOS", "LYT"]
    assert "OTH" in caplog.text
    assert cat.display_names == {"BLA": "blast", "EOS": "eosinophil", "LYT": "lymphocyte"}
    assert len(data.MATEK_CLASSES) == 16 and data.MATEK_CLASSES["NGS"] == "segmented neutrophil"
    split = load_split(tmp_path, n_per_class=3, n_heldout=1, image_size=8)
    assert split.train.per_class_counts() == {"BLA": 3, "EOS": 3, "LYT": 3}
    # explicitly asked: plain folders then include OTH
    assert scan(tmp_path, "folder").classes == ["BLA", "EOS", "LYT", "OTH"]


def test_load_selection_round_trip(folder: Path) -> None:
    split = load_split(folder, n_per_class=3, n_heldout=2, image_size=8, seed=3, classes=["c", "a"])
    assert split.classes == ["a", "c"]
    sel = json.loads(json.dumps(split.selection))
    assert sel["layout"] == "folder" and sel["classes"] == ["a", "c"]
    again = load_selection(sel)
    assert again.train.hashes == split.train.hashes
    assert again.heldout.hashes == split.heldout.hashes
    with pytest.raises(DataError, match="selection lacks"):
        load_selection({"root": str(folder)})


def test_data_dir_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROTOMED_DATA_DIR", str(tmp_path))
    assert data.data_dir() == tmp_path
    monkeypatch.delenv("PROTOMED_DATA_DIR")
    assert data.data_dir() == Path(data.__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.realdata
@pytest.mark.parametrize("size", [64, 32])
@pytest.mark.parametrize(("name", "n_classes"), [("derm64", 7), ("cells64", 8)])
def test_real_data(real_data: Path, name: str, n_classes: int, size: int) -> None:
    split = load_split(real_data / name, n_per_class=20, n_heldout=10, image_size=size)
    assert len(split.classes) == n_classes and split.skipped == []
    assert set(split.train.per_class_counts().values()) == {20}
    assert set(split.heldout.per_class_counts().values()) == {10}
    assert split.train.images.shape == (20 * n_classes, 3, size, size)
    assert not set(split.train.hashes) & set(split.heldout.hashes)
    if size == 64:  # the stored 64x64 PNGs load bit-exactly
        p = Path(split.train.paths[0])
        want = np.asarray(Image.open(p).convert("RGB"))
        assert np.array_equal(split.train.images[0].permute(1, 2, 0).numpy(), want)


def test_folder_manifest_split_groups_keep_lesions_on_one_side(tmp_path):
    """A manifest.csv with split_group (as derm64's) makes the folder split group-aware."""
    rows = ["image_id,dx,split_group"]
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(8):
            name = f"{cls}{i}"
            color = (i * 30 % 256, 40 if cls == "a" else 200, i * 7)
            Image.new("RGB", (12, 12), color).save(tmp_path / cls / f"{name}.png")
            rows.append(f"{name},{cls},{cls}-lesion{i // 2}")  # two images per lesion
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    for seed in range(5):
        split = load_split(tmp_path, n_per_class=2, n_heldout=2, image_size=8, seed=seed)
        lesion = lambda p: Path(p).stem[0] + "-lesion" + str(int(Path(p).stem[1:]) // 2)  # noqa: E731
        train_groups = {lesion(p) for p in split.train.paths}
        held_groups = {lesion(p) for p in split.heldout.paths}
        assert not train_groups & held_groups
