"""The mask competition's features (relabel, age bins, oversampling, losses, per-attribute view)
and the seed's leaks in the split, never to come back: no person in two splits, oversampled images
from the training split only (its soup leaks: tests/test_mask_soup.py)."""

import math

import numpy as np
import pytest
import torch

from soups import SoupsError, layouts, tracking
from soups.batches import oversampled_classes, train_loader
from soups.data import make_splits
from soups.evaluate import attribute_accuracy
from soups.layouts import read_layout
from soups.layouts.mask import read_relabel
from soups.losses import CrossEntropy, Focal, SupConPlusCE, supcon
from soups.models import create_model
from soups.recipe import Recipe, load_recipe, loader_settings
from soups.steps.finetune import finetune
from tests.conftest import TINY, make_mask_dataset, write_recipe


def labels_by_key(pool):
    return dict(zip(pool.keys, pool.labels.tolist(), strict=True))


def test_relabel_applies_each_correction_and_lists_the_changes(tmp_path, mask_root):
    fixes = tmp_path / "fix.yaml"
    fixes.write_text(
        'swap_incorrect_normal: ["000001"]\nincorrect_to_mask: [2]\nflip_gender: ["000003", "999999"]\n'
    )
    before = labels_by_key(read_layout("mask", mask_root)["pool"])
    parts = read_layout("mask", mask_root, relabel=str(fixes))
    after = labels_by_key(parts["pool"])
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {k for k, _, _ in parts["relabelled"]}
    p1 = "000001_female_Asian_45"
    assert after[f"train/images/{p1}/incorrect_mask.jpg"] == before[f"train/images/{p1}/normal.png"]
    assert after[f"train/images/{p1}/normal.png"] == before[f"train/images/{p1}/incorrect_mask.jpg"]
    p2 = "000002_male_Asian_65"
    assert after[f"train/images/{p2}/incorrect_mask.jpg"] == before[f"train/images/{p2}/mask1.jpg"]
    p3 = [k for k in before if "/000003_" in k]
    assert all(after[k] == before[k] - 3 for k in p3), "female -> male moves the label down by 3"
    assert len(changed) == 2 + 1 + 7


def test_relabel_file_formats_and_mistakes(tmp_path):
    csv = tmp_path / "fix.csv"
    csv.write_text("id,action\n001498-1,flip_gender\n000020,swap_incorrect_normal\n")
    assert read_relabel(csv)["flip_gender"] == {"001498-1"} and read_relabel(csv)[
        "swap_incorrect_normal"
    ] == {"000020"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("flip_sex: ['000001']\n")
    with pytest.raises(SoupsError, match="unknown action 'flip_sex'"):
        read_relabel(bad)
    with pytest.raises(SoupsError, match="relabel applies to the mask layout"):
        read_layout("imagefolder", tmp_path, relabel=str(bad))


def test_shipped_relabel_list_is_the_teams(tmp_path):
    from tests.conftest import ROOT

    fixes = read_relabel(ROOT / "configs" / "mask_relabel.yaml")
    assert fixes["swap_incorrect_normal"] == {"000020", "004418", "005227"}
    assert fixes["incorrect_to_mask"] == {"000645", "003574"}
    assert len(fixes["flip_gender"]) == 11 and "001498-1" in fixes["flip_gender"]


def test_age_bins_move_the_boundaries(tmp_path):
    root = make_mask_dataset(tmp_path, persons=3)  # ages 20, 45, 65
    (root / "train" / "images" / "000001_female_Asian_45").rename(
        root / "train" / "images" / "000001_female_Asian_29"
    )
    default = read_layout("mask", root)["pool"]
    moved = read_layout("mask", root, age_bins="29,59")["pool"]
    key = "train/images/000001_female_Asian_29/mask1.jpg"
    assert labels_by_key(default)[key] % 3 == 0 and labels_by_key(moved)[key] % 3 == 1
    assert moved.classes[1] == "wear/male/29-58"
    assert (
        make_splits({**read_layout("mask", root, age_bins="29,59"), "val": None}, 0.34, 0, 0).fingerprint
        != make_splits(read_layout("mask", root), 0.34, 0, 0).fingerprint
    ), "ingredients of other bins never share a soup"
    with pytest.raises(SoupsError, match="age_bins"):
        read_layout("mask", root, age_bins="60,30")


@pytest.fixture
def leaky_setup(tmp_path):
    """A mask dataset with oversampling and relabeling on."""
    root = make_mask_dataset(tmp_path / "mask", persons=18)
    fixes = tmp_path / "fix.yaml"
    fixes.write_text('flip_gender: ["000004", "000010"]\nswap_incorrect_normal: ["000005"]\n')
    recipe = Recipe(
        **{
            **TINY,
            "data": str(root),
            "layout": "mask",
            "oversample": "old",
            "oversample_factor": 3,
            "relabel": str(fixes),
            "workers": 0,
        }
    )
    from soups.recipe import load_splits

    return recipe, load_splits(recipe)


def test_no_person_in_two_splits_with_oversampling_and_relabeling(leaky_setup):
    recipe, splits = leaky_setup
    people = [set(s.groups) for s in (splits.train, splits.val, splits.test)]
    assert all(people) and not (people[0] & people[1] or people[0] & people[2] or people[1] & people[2])
    assert len(splits.relabelled) > 0
    # every image the training loader yields, the oversampled repeats included, is a training person's
    loader, _ = train_loader(splits, loader_settings(recipe))
    parts = loader.dataset.parts
    assert len(parts) == 3, "factor 3: the old classes are seen twice more"
    person = dict(zip(splits.train.keys, splits.train.groups, strict=True))
    seen = {person.get(k) for part in parts for k in part.source.keys}
    assert None not in seen and seen <= people[0] and not seen & (people[1] | people[2])


def test_oversampled_images_come_from_the_training_split_only(leaky_setup):
    recipe, splits = leaky_setup
    loader, _ = train_loader(splits, loader_settings(recipe))
    main, *extra = loader.dataset.parts
    old = oversampled_classes("old", splits.train.classes)
    assert old == [2, 5, 8, 11, 14, 17]
    train_keys = set(splits.train.keys)
    held_out = set(splits.val.keys) | set(splits.test.keys)
    assert len(extra) == 2, "factor 3: two more passes over the old classes"
    for part in extra:
        assert set(part.source.keys) <= train_keys and not set(part.source.keys) & held_out
        assert set(part.source.labels.tolist()) <= set(old)
    n_old_train = int(np.isin(splits.train.labels, old).sum())
    assert n_old_train > 0 and len(loader.dataset) == len(splits.train) + 2 * n_old_train
    with pytest.raises(SoupsError, match="not a class"):
        oversampled_classes("ancient", splits.train.classes)


def test_focal_loss_with_gamma_zero_is_cross_entropy_and_downweights_easy_examples():
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 4)
    with torch.no_grad():
        model.get_classifier().weight.normal_()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    model.eval()
    assert Focal(focal_gamma=0.0)(model, x, y).item() == pytest.approx(
        CrossEntropy()(model, x, y).item(), rel=1e-5
    )
    assert Focal(focal_gamma=2.0)(model, x, y).item() < CrossEntropy()(model, x, y).item()


def test_supcon_prefers_embeddings_grouped_by_class():
    y = torch.tensor([0, 0, 1, 1])
    grouped = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    mixed = torch.tensor([[1.0, 0], [0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    assert supcon(grouped, y) < supcon(mixed, y)
    assert supcon(grouped, torch.tensor([0, 1, 2, 3])).item() == 0.0, "no positives: nothing to pull"


@pytest.mark.parametrize("loss", ["cross_entropy", "focal", "supcon"])
def test_every_loss_trains_and_leaves_checkpoints_plain(tmp_path, tracking_uri, mask_root, loss):
    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml",
            experiment="losses",
            data=str(mask_root),
            layout="mask",
            **{**TINY, "epochs": 1},
        ),
        {"loss": loss},
    )
    run = tracking.get_run(finetune(recipe))
    assert run.info.status == "FINISHED" and run.data.params["loss"] == loss
    assert math.isfinite(run.data.metrics["train_loss"])
    assert {"val_mask_accuracy", "val_gender_accuracy", "val_age_accuracy", "val_f1"} <= set(run.data.metrics)
    from soups.models import load_checkpoint

    ckpt = load_checkpoint(tracking.cached_checkpoint(run)[0])
    assert set(ckpt.state_dict) == set(create_model("test_efficientnet", 18).state_dict()), (
        "no projection head"
    )
    model = create_model("test_efficientnet", 18)
    assert (
        SupConPlusCE(num_features=model.num_features)(
            model, torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1])
        )
        > 0
    )


def test_attribute_accuracy_reads_each_attribute():
    from soups.layouts.mask import mask_label

    labels = torch.tensor([mask_label(0, 0, 0), mask_label(1, 1, 2)])
    logits = torch.nn.functional.one_hot(torch.tensor([mask_label(0, 1, 0), mask_label(2, 1, 2)]), 18).float()
    assert attribute_accuracy(layouts.get("mask").attributes)(logits, labels) == {
        "val_mask_accuracy": 0.5,
        "val_gender_accuracy": 0.5,
        "val_age_accuracy": 1.0,
    }
