"""Greedy soup speed: soups vs a faithful re-implementation of the seed's loop, which for every
candidate reloads every checkpoint of the soup from disk, holds them all in memory to average
them, and rebuilds the held-out loader that decodes and resizes every JPEG again. Same
candidates, same held-out JPEGs (384x512), same model, same rule: the picks must be identical."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import Timer, command, mask_dataset, report
from soups import data
from soups.evaluate import EvalSet, Scorer
from soups.models import Checkpoint, create_model, load_checkpoint, normalisation, save_checkpoint
from soups.soup import Candidate, greedy_soup

SIZE, MODEL = 96, "test_efficientnet"


class SeedDataset(torch.utils.data.Dataset):
    """The seed's held-out dataset: opens and decodes the JPEG on every access."""

    def __init__(self, samples: data.Samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, j):
        return torch.from_numpy(data.resized(self.samples.read(j), SIZE)), int(self.samples.labels[j])


def seed_greedy(paths: list[Path], samples: data.Samples, mean, std, workers: int) -> list[int]:
    model = create_model(MODEL, 18).eval()

    def score(state) -> int:
        model.load_state_dict(state)
        loader = torch.utils.data.DataLoader(SeedDataset(samples), batch_size=64, num_workers=workers)
        correct = 0
        with torch.inference_mode():
            for x, y in loader:  # every JPEG decoded again, for every candidate
                correct += int((model(data.model_input(x, mean, std)).argmax(1) == y).sum())
        return correct

    def average(soup: list[int]) -> dict:
        states = [torch.load(paths[k], weights_only=True)["state_dict"] for k in soup]  # all in memory
        return {
            key: (sum(s[key].double() for s in states) / len(states)).to(states[0][key].dtype)
            if states[0][key].is_floating_point()
            else states[0][key]
            for key in states[0]
        }

    soup = [0]
    best = score(average(soup))
    for k in range(1, len(paths)):
        correct = score(average(soup + [k]))
        if correct >= best:
            soup.append(k)
            best = correct
    return soup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--candidates", type=int, default=12)
    parser.add_argument("--persons", type=int, default=143, help="7 JPEGs each (143: 1,001 images)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.gettempdir()) / "soups-bench"
    samples = data.read_layout("mask", mask_dataset(work / f"mask{args.persons}", args.persons))["pool"]
    torch.manual_seed(0)
    base = create_model(MODEL, 18)
    with torch.no_grad():
        base.get_classifier().weight.normal_(0, 1.0)
    mean, std = normalisation(base)
    # Labels are the base model's own predictions: the base scores 100%, light-noise variants
    # nearly as well, heavy-noise ones poorly; a spread like that of real fine-tunes, without
    # training anything. (Both sides score against the same labels.)
    decoded = data.decode(samples, SIZE, args.workers)
    from soups.evaluate import predict

    own = predict(base, EvalSet.from_decoded(decoded, 18), mean, std).argmax(1).numpy()
    samples = data.Samples(samples.keys, own.astype("int64"), samples.groups, samples.classes, samples.root)
    paths = []
    for k in range(args.candidates):  # fine-tune-like variants: the base plus noise of various sizes
        g = torch.Generator().manual_seed(k)
        scale = [0.0, 0.002, 0.05, 0.004, 0.3, 0.001, 0.1, 0.006][k % 8] * (1 + k // 8)
        state = {
            n: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for n, v in base.state_dict().items()
        }
        ckpt = Checkpoint(state, MODEL, 18, data.mask_classes(), SIZE, "bench", mean, std)
        paths.append(work / "ckpts" / f"c{k}.pt")
        save_checkpoint(ckpt, paths[-1])

    with Timer() as seed_t:
        seed_picks = seed_greedy(paths, samples, mean, std, args.workers)
    with Timer() as ours_t:
        held_out = EvalSet.from_decoded(data.decode(samples, SIZE, args.workers), 18)
        scorer = Scorer(create_model(MODEL, 18), held_out, mean, std, batch_size=64)
        cands = [Candidate(str(k), lambda p=p: load_checkpoint(p).state_dict) for k, p in enumerate(paths)]
        result = greedy_soup(cands, scorer.correct, len(held_out))
    ours_picks = [int(n) for n in result.ingredients]
    assert ours_picks == seed_picks, f"picks differ: soups {ours_picks}, seed-style {seed_picks}"
    ratio = seed_t.seconds / ours_t.seconds
    what = f"greedy soup, {args.candidates} candidates, {len(samples)} JPEGs 384x512 -> {SIZE}px"
    scored = f"{scorer.images_scored} of {args.candidates * len(samples)} images scored"
    row = {
        "what": what,
        "a": f"seed-style loop {seed_t.seconds:.1f} s",
        "b": f"soups {ours_t.seconds:.1f} s ({scored}; same picks {ours_picks})",
        "ratio": f"{ratio:.1f}x faster",
        "target": ">= 10x",
        "ok": ratio >= 10,
    }
    report("soup_speed", [row], command())


if __name__ == "__main__":
    main()
