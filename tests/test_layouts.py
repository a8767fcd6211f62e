"""Every registered layout meets the same contract (read, split, decode, infer's inputs, its
submission), and the csv layout, the newest, refuses bad listings in one line naming the file."""

import numpy as np
import pandas as pd
import pytest

from soups import SoupsError
from soups.data import decode, make_splits
from soups.layouts import LAYOUTS, get, inference_inputs, read_layout
from soups.recipe import load_recipe
from tests.conftest import make_fashion_mnist, make_imagefolder, make_mask_dataset, write_image, write_recipe


def make_csv(root, classes=("cat", "dog", "fox"), per_class=6, extra=None):
    """Images anywhere under root (not in class folders), listed in labels.csv."""
    rng = np.random.default_rng(0)
    rows = []
    for c, name in enumerate(classes):
        for k in range(per_class):
            rel = f"photos/batch{k % 2}/{name}_{k}.png"
            write_image(root / rel, rng, 40 + 70 * c)
            rows.append({"path": rel, "label": name, "group": f"{name}{k // 2}", **(extra or {})})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def make_mask_with_eval(root):
    make_mask_dataset(root, persons=6)
    rng = np.random.default_rng(1)
    ids = ["b.jpg", "a.png"]
    for name in ids:
        write_image(root / "eval" / "images" / name, rng, 90)
    pd.DataFrame({"ImageID": ids, "ans": 0}).to_csv(root / "eval" / "info.csv", index=False)
    return root


MAKERS = {
    "fashion-mnist": make_fashion_mnist,
    "imagefolder": make_imagefolder,
    "mask": make_mask_with_eval,
    "csv": make_csv,
}


def test_every_registered_layout_has_a_test_dataset_here():
    assert set(MAKERS) == set(LAYOUTS), "a new layout needs a maker here (and nothing else in this file)"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_contract(name, tmp_path):
    root = MAKERS[name](tmp_path / name)
    layout = get(name)
    assert layout.help and layout.name == name
    parts = read_layout(name, root)
    pool = parts["pool"]
    assert len(pool) > 0 and len(pool.groups) == len(pool.keys) == len(pool.labels)
    assert ((pool.labels >= 0) & (pool.labels < len(pool.classes))).all()
    for part in ("val", "test"):
        assert parts[part] is None or parts[part].classes == pool.classes
    splits = make_splits(parts, 0.25, 0.25, 0)
    again = make_splits(read_layout(name, root), 0.25, 0.25, 0)
    assert splits.fingerprint == again.fingerprint, "a split is a pure function of the data"
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):  # given parts too
        one, other = getattr(splits, a), getattr(splits, b)
        assert not set(one.keys) & set(other.keys), f"{name}: {a} and {b} share a file"
        assert not set(one.groups) & set(other.groups), f"{name}: {a} and {b} share a group"
    decoded = decode(splits.val, 16)
    assert decoded.pixels.shape == (len(splits.val), 16, 16, 3)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", data=str(root), layout=name))
    inputs = inference_inputs(recipe.layout, recipe.data, pool.classes)
    if inputs is None:  # infer predicts the model's test split: images it never trained on
        inputs = splits.test
    assert len(inputs) > 0 and decode(inputs, 16).pixels.shape[0] == len(inputs)
    if layout.submission is not None:
        frame = layout.submission(inputs, [0] * len(inputs))
        assert len(frame) == len(inputs)
    if layout.attributes is not None:
        split = layout.attributes.split(pool.labels)
        assert set(split) == set(layout.attributes.names)
        assert (layout.attributes.join(*(split[a] for a in layout.attributes.names)) == pool.labels).all()


def test_an_option_of_another_layout_is_refused_by_name(tmp_path):
    root = make_imagefolder(tmp_path / "f")
    with pytest.raises(SoupsError, match="relabel applies to the mask layout, not imagefolder"):
        read_layout("imagefolder", root, relabel="fixes.yaml")
    assert len(read_layout("imagefolder", root, age_bins="30,60", relabel="")["pool"]) > 0, "defaults pass"


def test_csv_layout_reads_groups_and_fixed_splits(tmp_path):
    root = make_csv(tmp_path / "c")
    frame = pd.read_csv(root / "labels.csv")
    frame["split"] = ["test" if k % 6 >= 4 else "train" for k in range(len(frame))]  # whole groups
    frame.to_csv(root / "labels.csv", index=False)
    parts = read_layout("csv", root)
    assert parts["val"] is None and len(parts["test"]) == 6
    assert parts["pool"].classes == ["cat", "dog", "fox"]
    splits = make_splits(parts, 0.34, 0.0, 0)
    assert {g for g in splits.val.groups} & set(splits.train.groups) == set()


@pytest.mark.parametrize(
    "rows, message",
    [
        ("file,label\nx.png,cat\n", "needs columns path,label"),
        ("path,label\n../outside.png,cat\n", "line 2: path '../outside.png' points outside"),
        ("path,label\nnotes.txt,cat\n", "line 2: 'notes.txt' is not an image"),
        ("path,label,split\nphotos/a.png,cat,holdout\n", "line 2: split 'holdout' must be one of"),
        ("path,label\n", "lists no images"),
    ],
)
def test_csv_layout_refuses_bad_listings_in_one_line(tmp_path, rows, message):
    (tmp_path / "labels.csv").write_text(rows)
    with pytest.raises(SoupsError, match=message) as e:
        read_layout("csv", tmp_path)
    assert str(tmp_path / "labels.csv") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ("copy_train_to_val", "train and val share 1 file, e.g. 'photos/batch0/cat_0.png'"),
        ("val_group_in_train", "train and val share 1 group, e.g. 'dog0'"),
        ("copy_val_to_test", "val and test share 1 file, e.g. 'photos/batch0/fox_0.png'"),
    ],
)
def test_parts_a_layout_supplies_never_share_a_file_or_a_group(tmp_path, change, message):
    """labels.csv fixes every part; a file (or a person) in two of them is refused in one line."""
    root = make_csv(tmp_path / "c")
    frame = pd.read_csv(root / "labels.csv")
    frame["split"] = frame.label.map({"cat": "train", "fox": "val", "dog": "test"})
    if change == "copy_train_to_val":
        frame = pd.concat([frame, frame.iloc[[0]].assign(split="val")])
    elif change == "val_group_in_train":
        frame.loc[frame.path.str.endswith("dog_0.png"), "split"] = "train"
        frame.loc[frame.path.str.endswith("dog_1.png"), "split"] = "val"
    else:
        frame = pd.concat([frame, frame[frame.path.str.endswith("fox_0.png")].assign(split="test")])
    frame.to_csv(root / "labels.csv", index=False)
    with pytest.raises(SoupsError, match=message) as e:
        make_splits(read_layout("csv", root), 0.25, 0.25, 0)
    assert str(e.value).startswith(f"csv layout at {root}") and "\n" not in str(e.value)
