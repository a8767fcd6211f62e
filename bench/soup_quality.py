"""Soup quality on the demo recipe (Fashion-MNIST, tf_efficientnet_lite0 from ImageNet weights):
for several split seeds, fine-tune sweep members i = 0..M-1 and compare test accuracy of the best
single model (chosen on val), the uniform soup, the greedy soup (each with and without BatchNorm
recalibration) and a soft-voting ensemble of the same members; plus time per image of a soup
against the ensemble. The library is driven directly (no tracking server): the numbers are the
same code paths the entry points run."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import command, report
from soups import data
from soups.ensemble import soft_vote
from soups.evaluate import EvalSet, Scorer, metrics, predict
from soups.finetune import train_config, train_loader
from soups.models import create_model, normalisation
from soups.recipe import load_recipe
from soups.soup import Candidate, greedy_soup, uniform_soup
from soups.train import fit


def one_seed(recipe_path: str, split_seed: int, members: int, overrides: dict) -> dict:
    base = load_recipe(recipe_path, {"split_seed": split_seed, **overrides})
    splits = data.load_splits(base)
    size, n_cls = base.img_size, len(splits.train.classes)
    val = EvalSet.from_decoded(data.decode(splits.val, size, base.workers), n_cls)
    test = EvalSet.from_decoded(data.decode(splits.test, size, base.workers), n_cls)
    bn = splits.train.subset(range(min(1000, len(splits.train))))
    bn_set = EvalSet.from_decoded(data.decode(bn, size, base.workers), n_cls)
    states, val_acc = [], []
    for i in range(members):
        recipe = load_recipe(recipe_path, {"split_seed": split_seed, "i": i, **overrides})
        torch.manual_seed(recipe.seed)
        model = create_model(recipe.model, n_cls, recipe.pretrained)
        mean, std = normalisation(model)
        last = fit(model, train_loader(splits, recipe)[0], val, train_config(recipe), mean, std)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        val_acc.append(last["val_accuracy"])
        print(f"split {split_seed} member {i}: val {last['val_accuracy']:.4f} lr {recipe.lr:.2e}", flush=True)
    order = sorted(range(members), key=lambda k: -val_acc[k])
    skeleton = create_model(base.model, n_cls)
    plain = Scorer(skeleton, val, mean, std)
    recal = Scorer(create_model(base.model, n_cls), val, mean, std, bn_images=bn_set)

    def test_acc(scorer, state, averaged=True) -> float:
        return metrics(scorer.logits(state, test, averaged), test.labels)["accuracy"]

    out = {"best single": test_acc(plain, states[order[0]], False)}
    uniform = uniform_soup(states[k] for k in order)
    out["uniform soup"] = test_acc(plain, uniform)
    out["uniform + BN recal"] = test_acc(recal, uniform)
    for name, scorer in (("greedy soup", plain), ("greedy + BN recal", recal)):
        cands = [Candidate(str(k), lambda k=k: states[k]) for k in order]
        result = greedy_soup(cands, scorer.correct, len(val))
        final = result.state_dict
        if scorer is recal and len(result.ingredients) > 1:
            final = {k: v.clone() for k, v in recal.load(final, True).state_dict().items()}
        out[name] = test_acc(scorer, final, False)
        out[f"{name} ingredients"] = len(result.ingredients)
    probs, start = [], time.perf_counter()
    for state in states:
        skeleton.load_state_dict(state)
        probs.append(predict(skeleton, test, mean, std).softmax(1))
    ensemble_s = time.perf_counter() - start
    out["soft-voting ensemble"] = metrics(soft_vote(probs).log(), test.labels)["accuracy"]
    skeleton.load_state_dict(uniform)
    start = time.perf_counter()
    predict(skeleton, test, mean, std)
    out["soup s/img"], out["ensemble s/img"] = (
        (time.perf_counter() - start) / len(test),
        ensemble_s / len(test),
    )
    out["member val"] = val_acc
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default="configs/demo.yaml")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--members", type=int, default=6)
    parser.add_argument("--lr", default="", help="override the space's lr range, e.g. 6e-4,1.2e-3")
    parser.add_argument("--epochs", type=int, default=0, help="override the recipe's epochs")
    parser.add_argument("--name", default="soup_quality")
    args = parser.parse_args()
    overrides = {"epochs": args.epochs} if args.epochs else {}
    if args.lr:
        lo, hi = (float(v) for v in args.lr.split(","))
        base = load_recipe(args.recipe)
        overrides["space"] = {**base.space, "lr": {"log_uniform": [lo, hi]}}
    runs = [one_seed(args.recipe, s, args.members, overrides) for s in range(args.seeds)]
    rows = []
    best = [r["best single"] for r in runs]
    for name in (
        "uniform soup",
        "uniform + BN recal",
        "greedy soup",
        "greedy + BN recal",
        "soft-voting ensemble",
    ):
        values = [r[name] for r in runs]
        extra = ""
        if name.startswith("greedy"):
            extra = f", ingredients kept {[r[name + ' ingredients'] for r in runs]}"
        gain = statistics.mean(values) - statistics.mean(best)
        rows.append(
            {
                "what": f"test accuracy over {args.seeds} split seeds x {args.members} members{extra}",
                "a": f"best single {pm(best)}",
                "b": f"{name} {pm(values)}",
                "ratio": f"{100 * gain:+.2f} points",
                "target": "report",
                "ok": None,
            }
        )
    soup_t = statistics.mean(r["soup s/img"] for r in runs)
    ens_t = statistics.mean(r["ensemble s/img"] for r in runs)
    rows.append(
        {
            "what": f"time per test image on CPU, {args.members}-model ensemble vs one soup",
            "a": f"ensemble {1000 * ens_t:.3f} ms",
            "b": f"soup {1000 * soup_t:.3f} ms",
            "ratio": f"{ens_t / soup_t:.1f}x",
            "target": "soup costs one model",
            "ok": None,
        }
    )
    report(args.name, rows, command())
    for r in runs:
        print("member val accuracies:", ", ".join(f"{v:.3f}" for v in r["member val"]))


def pm(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


if __name__ == "__main__":
    main()
