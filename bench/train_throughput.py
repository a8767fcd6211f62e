"""Training and scoring at the hardware's pace: images per second of the product's fine-tune step
(`train.fit` fed by `batches.train_loader`, exactly as `finetune` runs it: augmentation, EMA,
gradient clipping, the loader's worker choice) against a bare timm loop with the fastest settings
found on this machine, on the same batches of the demo recipe (tf_efficientnet_lite0, 48 px,
batch 64, the `light` augmentation its members draw). And the product's scoring (`evaluate.predict`
on the demo's 10,000 test images) against bare eager and `torch.compile`d inference.

The bare loop's candidates: the model's weights in NCHW or channels_last (the input is channels_last
either way: `data.model_input` permutes NHWC pixels), eager or `torch.compile`. Sides alternate
(A B A B) and each side keeps its best round: the machine's load drifts."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from bench.common import command, report
from soups.batches import train_loader
from soups.data import decode, model_input
from soups.evaluate import EvalSet, predict
from soups.models import create_model, normalisation
from soups.recipe import load_recipe, load_splits, loader_settings
from soups.steps.finetune import train_config
from soups.train import fit


def bare_rate(batches, model_name: str, classes: int, channels_last: bool, compiled: bool, warm: int = 3):
    """Images per second of AdamW + cross-entropy steps over `batches` (normalised tensors), after
    `warm` untimed steps; and the seconds those warm-up steps took (compilation, for compiled)."""
    model = create_model(model_name, classes).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_fn = torch.compile(model) if compiled else model
    start = time.perf_counter()
    seen, timed_from = 0, None
    for k, (x, y) in enumerate(batches):
        if k == warm:
            timed_from, warm_s = time.perf_counter(), time.perf_counter() - start
        loss = F.cross_entropy(step_fn(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y) if timed_from is not None else 0
    return seen / (time.perf_counter() - timed_from), warm_s


def product_rate(recipe, splits, val: EvalSet, epochs: int) -> list[float]:
    """images_per_s of each epoch of the product's fit, as its runs log it."""
    model = create_model(recipe.model, len(splits.train.classes))
    mean, std = normalisation(model)
    loader, _ = train_loader(splits, loader_settings(recipe), device=torch.device("cpu"))
    rates = []
    fit(
        model,
        loader,
        val,
        train_config(recipe),
        mean,
        std,
        "cpu",
        lambda e, m: rates.append(m["images_per_s"]),
    )
    return rates


def inference_rate(model, evalset: EvalSet, mean, std, compiled: bool) -> tuple[float, float]:
    """Images per second over the test set (a second pass), and the first pass's extra seconds."""
    model = model.eval()
    if compiled:
        model = torch.compile(model.to(memory_format=torch.channels_last))
    start = time.perf_counter()
    predict(model, evalset, mean, std, 128)
    first = time.perf_counter() - start
    start = time.perf_counter()
    predict(model, evalset, mean, std, 128)
    second = time.perf_counter() - start
    return len(evalset) / second, first - second


def training_rounds(recipe, splits, val: EvalSet, batches, classes: int, rounds: int, epochs: int):
    """Rounds of each side in turn: the bare loop's img/s for each weight layout, and the product
    fit's best warm epoch and first epoch."""
    bare = {"eager, NCHW weights": [], "eager, channels_last": []}
    product: list[float] = []
    first_epoch: list[float] = []
    for _ in range(rounds):
        for name, cl in (("eager, NCHW weights", False), ("eager, channels_last", True)):
            bare[name].append(bare_rate(batches, recipe.model, classes, cl, False)[0])
        rates = product_rate(recipe, splits, val, epochs)
        first_epoch.append(rates[0])
        product.append(max(rates[1:] or rates))
    return bare, product, first_epoch


def training_rows(
    size: str, first_epoch, best_name, best, ours, bare: dict, compiled: tuple[float, float] | None
) -> list[dict]:
    """The report rows on training: the fine-tune step vs the bare loop at its best, and the bare
    loop's weight layouts (with torch.compile's img/s and compile seconds when `compiled`)."""
    return [
        {
            "what": f"training img/s, {size}: the product's fine-tune step (fit + train_loader, best "
            f"warm epoch; first epoch {max(first_epoch):.0f}) vs a bare timm loop at its best "
            f"({best_name}) on the same batches",
            "a": f"bare loop {best:.0f} img/s",
            "b": f"fine-tune {ours:.0f} img/s",
            "ratio": f"{ours / best:.2f}x the bare loop",
            "target": ">= 0.9x",
            "ok": ours >= 0.9 * best,
        },
        {
            "what": "bare training loop: weights NCHW vs channels_last (input channels_last both)"
            + (
                f"; torch.compile + channels_last {compiled[0]:.0f} img/s after {compiled[1]:.0f} s"
                if compiled
                else ""
            ),
            "a": f"NCHW {max(bare['eager, NCHW weights']):.0f} img/s",
            "b": f"channels_last {max(bare['eager, channels_last']):.0f} img/s",
            "ratio": f"{max(bare['eager, channels_last']) / max(bare['eager, NCHW weights']):.2f}x",
            "target": "",
            "ok": None,
        },
    ]


def scoring_row(images: int, eager_inf: float, comp_inf: float, comp_extra: float) -> dict:
    """The report row on scoring: eager vs compiled inference, and when compiling pays off."""
    return {
        "what": f"scoring {images} test images (evaluate.predict, batch 128): eager vs "
        f"torch.compile, which first spends {comp_extra:.0f} s compiling",
        "a": f"eager {eager_inf:.0f} img/s",
        "b": f"compiled {comp_inf:.0f} img/s",
        "ratio": f"{comp_inf / eager_inf:.2f}x; pays off after "
        f"{comp_extra / max(1 / eager_inf - 1 / comp_inf, 1e-9):,.0f} images a process",
        "target": "",
        "ok": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default="configs/demo.yaml")
    parser.add_argument("--aug", default="light")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the product's fit per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    # Compile cold, as a fresh machine's first step would: inductor's on-disk cache would hide it.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="soups-bench-inductor-")
    recipe = load_recipe(args.recipe, {"aug": args.aug, "epochs": args.epochs})
    splits = load_splits(recipe)
    classes = len(splits.train.classes)
    val = EvalSet.from_decoded(decode(splits.val, recipe.img_size, recipe.workers), classes)
    mean, std = normalisation(create_model(recipe.model, classes))
    loader, _ = train_loader(splits, loader_settings(recipe))
    batches = [(model_input(x, mean, std), y) for _ in range(args.epochs) for x, y in loader]

    bare, product, first_epoch = training_rounds(
        recipe, splits, val, batches, classes, args.rounds, args.epochs
    )
    compiled_train, compile_s = (
        bare_rate(batches, recipe.model, classes, True, True) if args.compile else (0.0, 0.0)
    )
    best_name = max(bare, key=lambda k: max(bare[k]))
    best = max(bare[best_name])
    if compiled_train > best:
        best_name, best = "torch.compile, channels_last", compiled_train
    ours = max(product)

    test = EvalSet.from_decoded(decode(splits.test, recipe.img_size, recipe.workers), classes)
    model = create_model(recipe.model, classes)
    eager_inf, _ = inference_rate(model, test, mean, std, False)
    comp_inf, comp_extra = inference_rate(model, test, mean, std, True) if args.compile else (0.0, 0.0)
    size = f"{recipe.model} at {recipe.img_size}px, batch {recipe.batch_size}, aug {args.aug}"
    compiled = (compiled_train, compile_s) if args.compile else None
    rows = training_rows(size, first_epoch, best_name, best, ours, bare, compiled)
    if args.compile:
        rows.append(scoring_row(len(test), eager_inf, comp_inf, comp_extra))
    report("train_throughput", rows, command())


if __name__ == "__main__":
    main()
