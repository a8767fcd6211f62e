"""Soup quality on the demo recipe (Fashion-MNIST, tf_efficientnet_lite0 from ImageNet weights), on
the full 10,000-image test set, for several split seeds. Two sweeps per seed, with the same number
of training epochs per member:

- shared start: one start run of `start_epochs` epochs (member 0's draw), then each member trains
  `epochs` more from all of its weights, head included (the demo's recipe);
- independent: each member trains `start_epochs + epochs` epochs from the pretrained weights.

For each: the best single member (chosen on val, as the soup step's ranking does), every registered
soup method with the soup step's defaults (BatchNorm recalibrated on 1,000 training images), and a
soft-voting ensemble of the same members. The library is driven directly (no tracking server):
these are the functions the entry points run. Trained members are cached under
$SOUPS_CACHE/bench-members/ (~/.cache/soups by default): judging them again retrains nothing."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from bench.common import RESULTS, command, report
from bench.soup_quality_rows import DEFAULT_METHOD, rows
from soups.batches import train_loader
from soups.ensemble import soft_vote
from soups.evaluate import EvalSet, Scorer, metrics, predict
from soups.models import create_model, load_start, normalisation
from soups.recipe import load_recipe, load_splits, loader_settings
from soups.significance import paired_gain
from soups.soup import METHODS, Candidate, Kitchen
from soups.steps.finetune import train_config
from soups.steps.soup.ingredients import held_out_sets
from soups.steps.soup.step import SoupOptions
from soups.train import fit


@dataclass
class Sweep:
    name: str
    states: list[dict]
    val: list[float]  # each member's final val accuracy (the ranking metric)
    start: dict  # the weights every member started from
    epochs_per_member: int


def trained(path: Path, train) -> tuple[dict, float]:
    """A member from the cache, or trained now and cached (weights and val accuracy)."""
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return saved["state"], saved["val"]
    state, val = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": state, "val": val}, path)
    return state, val


def run_fit(recipe, splits, val: EvalSet, initial: dict | None):
    torch.manual_seed(recipe.seed)
    model = create_model(recipe.model, len(splits.train.classes), recipe.pretrained)
    if initial is not None:
        load_start(model, initial, "the start")
    mean, std = normalisation(model)
    last = fit(model, train_loader(splits, loader_settings(recipe))[0], val, train_config(recipe), mean, std)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, last["val_accuracy"]


def make_sweep(args, split_seed: int, shared: bool, splits, val: EvalSet, cache: Path) -> Sweep:
    # start: none, because the bench makes and loads the start itself (and the cache keys agree).
    overrides = {"split_seed": split_seed, "start": "none", **args.overrides}
    base = load_recipe(args.recipe, overrides)
    total = base.start_epochs + base.epochs
    pretrained = create_model(base.model, len(splits.train.classes), base.pretrained).state_dict()
    start = pretrained
    if shared:
        r = load_recipe(
            args.recipe, {**overrides, "i": 0, "epochs": base.start_epochs, **args.start_overrides}
        )
        start, acc = trained(cache / f"start-{key(r)}.pt", lambda: run_fit(r, splits, val, None))
        print(f"split {split_seed} start ({base.start_epochs} epochs): val {acc:.4f}", flush=True)
    states, vals = [], []
    for i in range(args.members):
        r = load_recipe(args.recipe, {**overrides, "i": i, "epochs": base.epochs if shared else total})
        tag = f"{'shared' if shared else 'indep'}-{key(r)}-{key(start) if shared else ''}"
        state, acc = trained(
            cache / f"{tag}.pt", lambda r=r: run_fit(r, splits, val, start if shared else None)
        )
        states.append(state)
        vals.append(acc)
        print(
            f"split {split_seed} {'shared' if shared else 'independent'} member {i}: val {acc:.4f} "
            f"lr {r.lr:.2e}",
            flush=True,
        )
    return Sweep("shared start" if shared else "independent", states, vals, start, total)


# Recipe fields that never change what a member learns: a new one must not retrain the cache.
NOT_TRAINING = ("experiment", "description", "registered_model", "system_metrics")


def key(thing) -> str:
    """A short digest of a recipe (the fields that change training, as YAML) or of a state dict
    (its first and last tensors)."""
    if isinstance(thing, dict):
        ks = sorted(thing)
        text = "".join(f"{k}{thing[k].double().sum().item():.6e}" for k in ks[:3] + ks[-3:])
    else:
        fields = {k: v for k, v in dataclasses.asdict(thing).items() if k not in NOT_TRAINING}
        text = yaml.safe_dump(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def judge(sweep: Sweep, scorer: Scorer, test: EvalSet, methods: list[str]) -> dict:
    """Test accuracy of the best single member (by val), each method's soup as it would ship, and
    the soft-voting ensemble; the val accuracy and ingredients of each soup."""
    order = sorted(range(len(sweep.states)), key=lambda k: -sweep.val[k])
    probs, start_t = [], time.perf_counter()
    for state in sweep.states:  # predicted here, not read from the logits memo: these are timed
        probs.append(
            predict(scorer.load(state, False), test, scorer.mean, scorer.std, scorer.batch_size).softmax(1)
        )
    ensemble_s = (time.perf_counter() - start_t) / len(test)
    out = {
        "best single": metrics(probs[order[0]].log(), test.labels)["accuracy"],
        "best single val": sweep.val[order[0]],
        "soft-voting ensemble": metrics(soft_vote(probs).log(), test.labels)["accuracy"],
        "ensemble s/img": ensemble_s,
    }
    for name in methods:
        cands = [Candidate(str(k), lambda k=k: sweep.states[k]) for k in order]
        started = time.perf_counter()
        method, params = parse_method(name)
        result = METHODS[method](Kitchen(cands, scorer, lambda: sweep.start), **params)
        state = result.state_dict
        if scorer.bn_images is not None:  # what ships is what was scored
            state = {k: v.clone() for k, v in scorer.load(state).state_dict().items()}
        t0 = time.perf_counter()
        model = scorer.load(state, recalibrate=False)  # the soup as it ships (recomputed above)
        logits = predict(model, test, scorer.mean, scorer.std, scorer.batch_size)  # timed, not memoised
        out["soup s/img"] = (time.perf_counter() - t0) / len(test)
        out[name] = metrics(logits, test.labels)["accuracy"]
        gain = paired_gain(logits.argmax(1) == test.labels, probs[order[0]].argmax(1) == test.labels)
        out[f"{name} interval"] = [100 * gain.low, 100 * gain.high]
        out[f"{name} val"] = result.accuracy
        out[f"{name} kept"] = len(result.ingredients)
        out[f"{name} s"] = t0 - started
        print(
            f"  {sweep.name} {name}: test {out[name]:.4f} val {result.accuracy:.4f} "
            f"kept {len(result.ingredients)}",
            flush=True,
        )
    return out


def parse_method(spec: str) -> tuple[str, dict]:
    """`greedy` or `greedy:accept=prefix` (a method with some of its parameters)."""
    name, _, rest = spec.partition(":")
    return name, dict(kv.split("=", 1) for kv in rest.split("+") if kv)


def one_seed(args, split_seed: int, methods: list[str]) -> dict:
    base = load_recipe(args.recipe, {"split_seed": split_seed, **args.overrides})
    splits = load_splits(base)
    n_cls = len(splits.train.classes)
    val, test, bn = held_out_sets(splits, base, n_cls, None if args.no_bn else SoupOptions.bn_images)
    skeleton = create_model(base.model, n_cls)
    mean, std = normalisation(skeleton)
    scorer = Scorer(skeleton, val, mean, std, 2 * base.batch_size, "cpu", bn)
    cache = Path(os.environ.get("SOUPS_CACHE", "~/.cache/soups")).expanduser() / "bench-members"
    out = {"test images": len(test), "val images": len(val)}
    for shared in (True, False) if args.independent else (True,):
        sweep = make_sweep(args, split_seed, shared, splits, val, cache)
        out[sweep.name] = judge(sweep, scorer, test, methods)
        out[sweep.name]["epochs per member"] = sweep.epochs_per_member
        out[sweep.name]["member val"] = sweep.val
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="configs/demo.yaml")
    parser.add_argument("--seeds", default="0,1,2", help="split seeds, comma-separated")
    parser.add_argument("--members", type=int, default=4, help="members per sweep (the demo trains 4)")
    parser.add_argument(
        "--methods",
        default=",".join([*METHODS, *(f"{DEFAULT_METHOD}:accept={a}" for a in ("each", "prefix"))]),
        help="soup methods to judge, comma-separated; `name:param=value+param=value` sets parameters",
    )
    parser.add_argument("--set", action="append", default=[], help="recipe override key=value (repeatable)")
    parser.add_argument("--start-set", action="append", default=[], help="override for the start run only")
    parser.add_argument(
        "--no-independent",
        dest="independent",
        action="store_false",
        help="skip the independent sweep (exploration only)",
    )
    parser.add_argument("--no-bn", action="store_true", help="no BatchNorm recalibration (the step's off)")
    parser.add_argument("--name", default="soup_quality")
    parser.add_argument(
        "--rows-only",
        action="store_true",
        help="train and judge nothing: rebuild the rows from the per-seed results the last run saved",
    )
    args = parser.parse_args()
    args.overrides = dict(kv.split("=", 1) for kv in args.set)
    args.start_overrides = dict(kv.split("=", 1) for kv in args.start_set)
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {}
    if args.rows_only:
        saved = json.loads((RESULTS / f"{args.name}_seeds.json").read_text())
        runs = {int(seed): result for seed, result in saved.items()}
        seeds = []
    for seed in seeds:
        runs[seed] = one_seed(args, seed, methods)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.name}_seeds.json").write_text(json.dumps(runs, indent=1))
    if args.rows_only:  # the numbers are the last full run's: say so, with its command and time
        last = json.loads((RESULTS / f"{args.name}.json").read_text())
        how = f"{last['command']} (rows rebuilt by {command()})"
        report(args.name, rows(runs, methods, args), how, last["seconds"])
    else:
        report(args.name, rows(runs, methods, args), command())


if __name__ == "__main__":
    main()
