from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soups import SoupsError
from soups.batches import ImageDataset
from soups.data import decode, make_splits
from soups.layouts import read_layout
from soups.layouts.files import unlabelled
from soups.layouts.mask import age_bin, mask_classes, mask_eval, mask_label
from tests.conftest import make_imagefolder, make_mask_dataset, write_image
from tests.test_layouts import make_csv, make_mask_with_eval


@pytest.mark.parametrize(
    "folder, stem, label, name",
    [
        ("000001_male_Asian_20", "mask3", 0, "wear/male/<30"),
        ("000002_female_Asian_45", "mask1", 4, "wear/female/30-59"),
        ("000003_male_Asian_60", "incorrect_mask", 8, "incorrect/male/>=60"),
        ("000004_female_Asian_29", "normal", 15, "not wear/female/<30"),
        ("001498-1_female_Asian_59", "normal", 16, "not wear/female/30-59"),
        ("000005_female_Asian_60", "normal", 17, "not wear/female/>=60"),
    ],
)
def test_mask_labels_follow_the_competition_encoding(tmp_path, folder, stem, label, name):
    write_image(tmp_path / "train" / "images" / folder / f"{stem}.jpeg", np.random.default_rng(0), 100)
    pool = read_layout("mask", tmp_path)["pool"]
    assert pool.labels.tolist() == [label]
    assert pool.classes[label] == name and len(pool.classes) == 18
    assert pool.groups == [folder.split("_")[0]]


def test_label_helpers():
    assert [age_bin(a) for a in (0, 29, 30, 59, 60, 99)] == [0, 0, 1, 1, 2, 2]
    assert sorted({mask_label(m, g, a) for m in range(3) for g in range(2) for a in range(3)}) == list(
        range(18)
    )
    assert mask_classes((29, 59))[1] == "wear/male/29-58"


def test_grouped_split_is_deterministic_and_disjoint(mask_root):
    parts = read_layout("mask", mask_root)
    a = make_splits(parts, 0.25, 0.25, split_seed=7)
    b = make_splits(read_layout("mask", mask_root), 0.25, 0.25, split_seed=7)
    assert a.fingerprint == b.fingerprint and a.val.keys == b.val.keys and a.train.keys == b.train.keys
    persons = [set(s.groups) for s in (a.train, a.val, a.test)]
    assert all(p for p in persons), "every split has people"
    assert not (persons[0] & persons[1] or persons[0] & persons[2] or persons[1] & persons[2])
    assert len(a.train) + len(a.val) + len(a.test) == len(parts["pool"])
    for s in (a.train, a.val, a.test):  # all seven photos of a person land together
        assert all(s.groups.count(g) == 7 for g in set(s.groups))
    c = make_splits(parts, 0.25, 0.25, split_seed=8)
    assert c.fingerprint != a.fingerprint


def test_split_caps_are_subsets_and_deterministic(fmnist_root):
    parts = read_layout("fashion-mnist", fmnist_root)
    s = make_splits(parts, 0.2, 0.0, 0, max_train=50, max_val=10, max_test=20)
    assert (len(s.train), len(s.val), len(s.test)) == (50, 10, 20)
    assert s.test.keys[0].startswith("t10k-images"), "Fashion-MNIST's own test file is the test split"
    assert not set(s.train.keys) & set(s.val.keys)
    assert make_splits(parts, 0.2, 0.0, 0, max_train=50, max_val=10, max_test=20).train.keys == s.train.keys


def test_fashion_mnist_images_decode_as_rgb(fmnist_root):
    pool = read_layout("fashion-mnist", fmnist_root)["pool"]
    d = decode(pool.subset([0, 1, 2]), 48)
    assert d.pixels.shape == (3, 48, 48, 3) and d.pixels.dtype == np.uint8
    assert (d.pixels[..., 0] == d.pixels[..., 2]).all()


def test_imagefolder_with_and_without_given_splits(tmp_path):
    flat = make_imagefolder(tmp_path / "flat")
    parts = read_layout("imagefolder", flat)
    assert parts["pool"].classes == ["cat", "dog", "fox"] and parts["test"] is None
    nested = tmp_path / "nested"
    make_imagefolder(nested / "train")
    make_imagefolder(nested / "test", classes=("dog",), per_class=3, seed=1)
    s = make_splits(read_layout("imagefolder", nested), 0.25, 0.5, 0)
    assert len(s.test) == 3 and set(s.test.labels.tolist()) == {1}, (
        "test/ is used as given, dog keeps label 1"
    )
    assert len(s.train) + len(s.val) == 24


def test_fingerprint_follows_the_held_out_files(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    first = make_splits(read_layout("imagefolder", root), 0.25, 0.25, 0).fingerprint
    assert make_splits(read_layout("imagefolder", root), 0.25, 0.25, 0).fingerprint == first
    assert make_splits(read_layout("imagefolder", root), 0.30, 0.25, 0).fingerprint != first


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: (r / "cat").mkdir(parents=True), "class folder .*cat has no images"),
        (
            lambda r: write_image(
                r / "train" / "images" / "abc_male_x_20" / "mask1.jpg", np.random.default_rng(0), 1
            ),
            "does not parse",
        ),
    ],
)
def test_bad_layouts_name_the_folder(tmp_path, make, message):
    make(tmp_path)
    layout = "mask" if (tmp_path / "train").exists() else "imagefolder"
    with pytest.raises(SoupsError, match=message):
        read_layout(layout, tmp_path)


def test_missing_data_and_unexpected_mask_file(tmp_path):
    with pytest.raises(SoupsError, match="not found"):
        read_layout("imagefolder", tmp_path / "absent")
    with pytest.raises(SoupsError, match="Fashion-MNIST files missing"):
        read_layout("fashion-mnist", tmp_path)
    folder = tmp_path / "train" / "images" / "000001_male_Asian_20"
    write_image(folder / "selfie.jpg", np.random.default_rng(0), 1)
    with pytest.raises(SoupsError, match="unexpected file .*selfie.jpg"):
        read_layout("mask", tmp_path)


def test_train_csv_paths_cannot_escape_the_dataset(tmp_path):
    make_mask_dataset(tmp_path, persons=2)
    (tmp_path / "train" / "train.csv").write_text("id,gender,race,age,path\n1,male,Asian,20,../../../etc\n")
    with pytest.raises(SoupsError, match="outside the dataset root"):
        read_layout("mask", tmp_path)


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 this is not a jpeg"])
def test_unreadable_image_is_named_or_skipped(tmp_path, content):
    root = make_imagefolder(tmp_path, per_class=2)
    bad = root / "dog" / "broken.jpg"
    bad.write_bytes(content)
    pool = read_layout("imagefolder", root)["pool"]
    with pytest.raises(SoupsError, match="cannot read image .*broken.jpg"):
        decode(pool, 16)
    d = decode(pool, 16, skip_bad=True)
    assert d.skipped == ["dog/broken.jpg"] and len(d.labels) == len(pool) - 1


def test_truncated_jpeg_is_refused(tmp_path):
    root = make_imagefolder(tmp_path, per_class=1)
    path = root / "cat" / "000.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(SoupsError, match="000.jpg"):
        decode(read_layout("imagefolder", root)["pool"], 16)


def test_dataset_decodes_on_the_fly_and_from_memory_alike(mask_root):
    pool = read_layout("mask", mask_root)["pool"].subset(range(5))
    lazy, cached = ImageDataset(pool, 20), ImageDataset(decode(pool, 20), 20)
    for j in range(5):
        assert lazy[j][1] == cached[j][1] and (lazy[j][0] == cached[j][0]).all()


def test_fingerprint_follows_the_held_out_labels(tmp_path):
    """The same files with other labels (a relabel list) are another split: no shared soup."""
    from tests.conftest import make_mask_dataset

    root = make_mask_dataset(tmp_path / "m", persons=9)
    plain = make_splits(read_layout("mask", root), 0.34, 0.0, 0)
    person = plain.val.groups[0]
    fixes = tmp_path / "fix.yaml"
    fixes.write_text(f'flip_gender: ["{person}"]\n')
    relabelled = make_splits(read_layout("mask", root, relabel=str(fixes)), 0.34, 0.0, 0)
    assert relabelled.val.keys == plain.val.keys and relabelled.fingerprint != plain.fingerprint
    assert make_splits(read_layout("mask", root), 0.34, 0.0, 0).fingerprint == plain.fingerprint


def mask_with_listing(root):
    """The competition's own shape: train/train.csv lists the person folders, eval/ beside."""
    make_mask_with_eval(root)
    folders = sorted(d.name for d in (root / "train" / "images").iterdir())
    (root / "train" / "train.csv").write_text("id,path\n" + "".join(f"{f[:6]},{f}\n" for f in folders))
    return root


FILE_LAYOUTS = {"imagefolder": make_imagefolder, "csv": make_csv, "mask": mask_with_listing}
IMAGE_FOLDERS = {"imagefolder": ["cat"], "csv": ["photos"], "mask": ["train/images", "eval/images"]}


def read_all(layout, data):
    """What a layout reads at `data`: its pool, every image infer's whole folder sees, and (mask)
    its eval inputs."""
    pool = read_layout(layout, data)["pool"]
    decode(pool, 8)  # every key names a readable file
    whole = unlabelled(Path(data), pool.classes).keys
    extra = mask_eval(Path(data)).keys if layout == "mask" else []
    return pool.keys, whole, extra


@pytest.mark.parametrize("layout", sorted(FILE_LAYOUTS))
def test_a_relative_data_path_reads_like_the_absolute_one(tmp_path, monkeypatch, layout):
    FILE_LAYOUTS[layout](tmp_path / "data")
    keys, whole, extra = read_all(layout, tmp_path / "data")
    assert len(keys) and len(whole) >= len(keys)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert read_all(layout, "../data") == (keys, whole, extra)


@pytest.mark.parametrize("layout", sorted(FILE_LAYOUTS))
def test_a_symlinked_image_folder_reads_like_a_real_one(tmp_path, layout):
    """Images kept on another disk, linked into the dataset: the same keys, every image found."""
    root = FILE_LAYOUTS[layout](tmp_path / "data")
    before = read_all(layout, root)
    for k, name in enumerate(IMAGE_FOLDERS[layout]):
        folder, elsewhere = root / name, tmp_path / f"disk{k}" / Path(name).name
        elsewhere.parent.mkdir()
        folder.rename(elsewhere)
        folder.symlink_to(elsewhere, target_is_directory=True)
    assert read_all(layout, root) == before


def test_a_missing_data_folder_says_how_to_get_the_demo_data_or_use_your_own(tmp_path):
    from soups.data import data_root

    with pytest.raises(SoupsError, match=r"not found: .*`make data`.*-P data=<folder>.*layout=imagefolder"):
        data_root(tmp_path / "nowhere")


def test_an_image_unreadable_in_a_loader_process_is_one_line_naming_it():
    """DataLoader wraps a worker's exception in the worker's traceback; the line users see is the
    exception's own message."""
    import torch

    from soups import one_line

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, j):
            if j == 2:
                raise SoupsError("cannot read image /data/cat/7.png: truncated\n  at byte 200")
            return j

    with pytest.raises(SoupsError) as caught:
        list(torch.utils.data.DataLoader(Broken(), batch_size=2, num_workers=2))
    assert "Traceback" in str(caught.value)
    assert one_line(caught.value) == "cannot read image /data/cat/7.png: truncated at byte 200"
    assert one_line(SoupsError("two\n  lines")) == "two lines"
