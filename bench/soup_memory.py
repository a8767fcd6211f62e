"""Soup memory: peak RSS of a greedy soup over N=4 and N=16 candidates of a 25.6 M-parameter
model (resnet50, random weights: this is about memory, not accuracy), soups' streaming average
vs the seed-style loop that holds every state dict of the soup. Each run is its own process."""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import command, report

MODEL, SIZE, N_IMAGES, CLASSES = "resnet50", 64, 16, 1000


def child(side: str, n: int, work: Path) -> None:
    from bench.soup_speed import seed_greedy  # noqa: F401  (same rule as the speed benchmark)
    from soups import data
    from soups.evaluate import EvalSet, Scorer
    from soups.models import create_model, load_checkpoint
    from soups.soup import Candidate, greedy_soup

    paths = [work / f"c{k}.pt" for k in range(n)]
    held = torch.load(work / "held_out.pt", weights_only=True)
    evalset = EvalSet(held["images"], held["labels"], CLASSES)
    mean, std = [0.5] * 3, [0.5] * 3
    if side == "soups":
        scorer = Scorer(create_model(MODEL, CLASSES), evalset, mean, std)
        result = greedy_soup(
            [Candidate(str(k), lambda p=p: load_checkpoint(p).state_dict) for k, p in enumerate(paths)],
            scorer.correct,
            len(evalset),
        )
        kept = len(result.ingredients)
    else:
        model = create_model(MODEL, CLASSES).eval()

        def score(state):
            model.load_state_dict(state)
            with torch.inference_mode():
                return int(
                    (model(data.model_input(evalset.images, mean, std)).argmax(1) == evalset.labels).sum()
                )

        soup, best = [0], None
        for k in range(n):
            members = soup if k == 0 else soup + [k]
            states = [torch.load(paths[m], weights_only=True)["state_dict"] for m in members]  # all held
            avg = {
                key: sum(s[key].double() for s in states) / len(states)
                if states[0][key].is_floating_point()
                else states[0][key]
                for key in states[0]
            }
            correct = score({key: v.float() if v.is_floating_point() else v for key, v in avg.items()})
            del states, avg
            if best is None or correct >= best:
                best = correct
                if k:
                    soup.append(k)
        kept = len(soup)
    print(f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} {kept}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "N"))
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "soups-bench" / "memory"))
    args = parser.parse_args()
    work = Path(args.work)
    if args.child:
        return child(args.child[0], int(args.child[1]), work)

    from soups.evaluate import EvalSet, predict
    from soups.models import Checkpoint, create_model, save_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = create_model(MODEL, CLASSES)
    with torch.no_grad():
        base.get_classifier().weight.normal_(0, 0.05)
    params = sum(p.numel() for p in base.parameters())
    images = torch.randint(0, 255, (N_IMAGES, SIZE, SIZE, 3), dtype=torch.uint8)
    labels = predict(
        base, EvalSet(images, torch.zeros(N_IMAGES, dtype=torch.long), CLASSES), [0.5] * 3, [0.5] * 3
    ).argmax(1)
    torch.save({"images": images, "labels": labels}, work / "held_out.pt")
    for k in range(16):  # near-identical candidates: every one joins the soup, the seed's worst case
        state = {n: v + 1e-6 * k if v.is_floating_point() else v for n, v in base.state_dict().items()}
        save_checkpoint(
            Checkpoint(
                state, MODEL, CLASSES, [str(c) for c in range(CLASSES)], SIZE, "m", [0.5] * 3, [0.5] * 3
            ),
            work / f"c{k}.pt",
        )
    peak = {}
    for side in ("soups", "seed"):
        for n in (4, 16):
            out = subprocess.run(
                [sys.executable, "-m", "bench.soup_memory", "--child", side, str(n), "--work", str(work)],
                capture_output=True,
                text=True,
                check=True,
            )
            mib, kept = out.stdout.split()[-2:]
            peak[side, n] = float(mib)
            print(f"{side} N={n}: peak RSS {mib} MiB, {kept} ingredients kept")
    rows = []
    for side, target in (("soups", 1.15), ("seed", None)):
        ratio = peak[side, 16] / peak[side, 4]
        rows.append(
            {
                "what": f"{side} greedy soup peak RSS, {MODEL} "
                f"({params / 1e6:.1f} M params), every candidate kept",
                "a": f"N=4: {peak[side, 4]:.0f} MiB",
                "b": f"N=16: {peak[side, 16]:.0f} MiB",
                "ratio": f"{ratio:.2f}",
                "target": f"<= {target}" if target else "(for comparison)",
                "ok": ratio <= target if target else None,
            }
        )
    report("soup_memory", rows, command())


if __name__ == "__main__":
    main()
