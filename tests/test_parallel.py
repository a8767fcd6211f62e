"""Data-parallel batches and resumable training, in one process: the pieces `torchrun` and
`resume` are built from (tests/test_distributed.py starts the real processes)."""

import copy
import dataclasses

import mlflow
import pytest
import torch

from soups import SoupsError, distributed
from soups.batches import train_loader
from soups.data import make_splits
from soups.distributed import RankBatches, World
from soups.layouts import read_layout
from soups.recipe import Recipe, load_recipe, loader_settings
from soups.steps.finetune import finetune, resume
from soups.train import fit
from tests.conftest import TINY, make_imagefolder, write_recipe
from tests.test_train import setup


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("colours"), per_class=16)


def test_ranks_share_each_single_process_batch_without_overlap():
    def batches():
        sampler = torch.utils.data.RandomSampler(range(21), generator=torch.Generator().manual_seed(3))
        return torch.utils.data.BatchSampler(sampler, 6, drop_last=True)

    single = list(batches())
    ranks = [list(RankBatches(batches(), World(rank, 3))) for rank in range(3)]
    for k, batch in enumerate(single):
        parts = [r[k] for r in ranks]
        assert sorted(sum(parts, [])) == sorted(batch) and all(len(p) == 2 for p in parts)
    assert len(ranks[0]) == len(single) == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_augment_their_shares_exactly_as_one_process_augments_the_batch(colours, workers):
    """With augmentation on, the ranks' shares of each batch are the single process's batch, pixel
    for pixel (each image is augmented from its position's seed, so loader workers change nothing
    either), and the ranks do not augment in lockstep: one image at every position of an epoch gets
    flips and crops that differ from rank to rank."""
    splits = make_splits(read_layout("imagefolder", colours), 0.25, 0.0, 0)
    # cache_mb=0: decoded in the loader, where workers stay
    given = {"aug": "heavy", "batch_size": 6, "workers": workers, "cache_mb": 0}
    recipe = Recipe(**{**TINY, "data": str(colours), "layout": "imagefolder", **given})

    def epoch(world: World, source=splits.train) -> list:
        loader = train_loader(dataclasses.replace(splits, train=source), loader_settings(recipe), world)[0]
        assert loader.num_workers == workers
        return [images for images, _ in loader]

    single = epoch(World())
    ranks = [epoch(World(rank, 3)) for rank in range(3)]
    assert len(single) == len(ranks[0]) == 6
    for k, batch in enumerate(single):
        together = torch.stack([r[k][j] for j in range(2) for r in ranks])
        assert torch.equal(together, batch)
    # One image everywhere: what differs between positions is the augmentation alone.
    same = splits.train.subset([0] * len(splits.train))
    first = [epoch(World(rank, 3), same)[0][0] for rank in range(3)]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])


def test_an_images_own_seed_leaves_the_pipelines_steps_independent():
    """Two flips at p=0.5 on one asymmetric image, reseeded image by image: all four on/off
    combinations appear (steps seeded alike would flip together: two combinations), and a seed
    gives the same image every time."""
    import albumentations as A
    import numpy as np

    from soups.batches import ImageDataset
    from soups.data import Decoded

    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(1, 4, 4, 3)
    flips = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    images = ImageDataset(Decoded(pixels, np.zeros(1, dtype=np.int64), ["a"], []), 4, flips)
    original = torch.from_numpy(pixels[0])

    def seen(seed: int) -> tuple[bool, bool]:
        out = images[(0, seed)][0]
        return bool(torch.equal(out, original.flip(1)) or torch.equal(out, original.flip(0, 1))), bool(
            torch.equal(out, original.flip(0)) or torch.equal(out, original.flip(0, 1))
        )

    assert {seen(seed) for seed in range(64)} == {(False, False), (False, True), (True, False), (True, True)}
    assert all(torch.equal(images[(0, seed)][0], images[(0, seed)][0]) for seed in range(8))


def test_a_batch_that_does_not_split_evenly_is_refused():
    assert distributed.check_batch(32, World(0, 4)) == 8
    with pytest.raises(SoupsError, match="batch_size=30 does not split evenly over 4 processes"):
        distributed.check_batch(30, World(0, 4))


def test_torchrun_runs_the_same_command_as_n_processes():
    command = distributed.torchrun_command(2, "entrypoints/finetune.py", ["--i", "3"])
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--",
        "entrypoints/finetune.py",
        "--i",
        "3",
    ]


@pytest.mark.parametrize("aug", ["none", "medium"])
def test_training_resumed_from_a_saved_state_ends_with_the_same_weights(colours, aug):
    """Stopped after epoch 1 of 3 and continued from its state: the same weights, bit for bit,
    as the uninterrupted fit (augmentation and data order continue where they were)."""
    states = {}
    model, loader, val, cfg = setup(colours, epochs=3, aug=aug, save_every=1, ema=0.5)
    fit(
        model,
        loader,
        val,
        cfg,
        [0.5] * 3,
        [0.5] * 3,
        on_state=lambda e, s: states.setdefault(e, copy.deepcopy(s)),
    )
    assert sorted(states) == [1, 2], "a state after every epoch but the last"
    again, loader2, _, _ = setup(colours, epochs=3, aug=aug, save_every=1, ema=0.5)
    seen = []
    fit(
        again, loader2, val, cfg, [0.5] * 3, [0.5] * 3, on_epoch=lambda e, m: seen.append(e), resume=states[1]
    )
    assert seen == [2, 3]
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.fixture
def tiny_recipe(tmp_path, colours):
    return write_recipe(
        tmp_path / "r.yaml",
        experiment="resume",
        data=str(colours),
        layout="imagefolder",
        **{**TINY, "epochs": 1},
    )


def test_resume_refuses_runs_it_cannot_continue(tiny_recipe, tracking_uri):
    done = finetune(load_recipe(tiny_recipe))
    with pytest.raises(SoupsError, match=f"resume={done}: the run FINISHED; nothing is left to train"):
        resume(done)
    client = mlflow.MlflowClient()
    run = client.create_run(client.get_run(done).info.experiment_id)
    client.set_tag(run.info.run_id, "soups.role", "ingredient")
    with pytest.raises(SoupsError, match="kept no training state .* -P save_every=K"):
        resume(run.info.run_id)
    with pytest.raises(SoupsError, match="is not a run id"):
        resume("../../etc")


def test_resume_refuses_a_run_whose_process_still_beats(tiny_recipe, tracking_uri):
    """A RUNNING run whose heartbeat is fresh may still be training: a second process would train
    and upload into the same run. Refused, saying how long until it counts as gone."""
    import time

    from soups import tracking

    done = finetune(load_recipe(tiny_recipe))
    client = mlflow.MlflowClient()
    run = client.create_run(client.get_run(done).info.experiment_id).info.run_id
    tags = {"soups.role": "ingredient", "soups.state_epoch": "1", "soups.heartbeat_every": "30"}
    for k, v in {**tags, "soups.heartbeat": str(time.time() - 10)}.items():
        client.set_tag(run, k, v)
    said = rf"^resume={run}: the run is RUNNING and its process said it was alive 1\d s ago; if that process"
    with pytest.raises(SoupsError, match=said + r" is gone, resume again in [78]\d s$"):
        resume(run)
    client.set_tag(run, "soups.heartbeat", str(time.time() - 91))  # three beats missed: gone
    assert tracking.resumable(run).info.run_id == run
    client.set_tag(run, "soups.heartbeat", str(time.time()))
    client.set_terminated(run, "FAILED")  # ended: no process of its own, whatever the last beat
    assert tracking.resumable(run).info.run_id == run


def test_two_processes_resuming_one_dead_run_at_the_same_moment_leave_one_training(tiny_recipe, tracking_uri):
    """Both find the run dead and pass `resumable`; each claims it (a token with a fresh beat),
    waits and reads back: one goes on, the other stops in one line. Anyone later is refused
    by the fresh beat, even on a run that ended FAILED."""
    import threading

    from soups import tracking
    from soups.tracking.resume import claim

    done = finetune(load_recipe(tiny_recipe))
    client = mlflow.MlflowClient()
    run = client.create_run(client.get_run(done).info.experiment_id).info.run_id
    for k, v in {"soups.role": "ingredient", "soups.state_epoch": "1"}.items():
        client.set_tag(run, k, v)
    client.set_terminated(run, "FAILED")
    assert tracking.resumable(run).info.run_id == run
    outcomes: list[str] = []

    def resumer() -> None:
        try:
            claim(run)
            outcomes.append("trains")
        except SoupsError as e:
            outcomes.append(str(e))

    both = [threading.Thread(target=resumer) for _ in range(2)]
    for t in both:
        t.start()
    for t in both:
        t.join()
    stopped = [o for o in outcomes if o != "trains"]
    assert outcomes.count("trains") == 1 and len(stopped) == 1, outcomes
    assert "resumed the run at the same moment; it trains, this one stops" in stopped[0]
    with pytest.raises(SoupsError, match="a process resuming the run said it was alive"):
        tracking.resumable(run)


def test_a_sigterm_while_the_failed_run_is_being_ended_still_leaves_it_failed(tracking_uri, monkeypatch):
    """torchrun SIGTERMs rank 0 right after the other rank dies; when that lands inside `end_run`
    (rank 0 already failing on the lost peer), the run must still end FAILED, not RUNNING."""
    import os
    import signal

    from soups import tracking

    real_end = mlflow.end_run

    def end_run_hit_by_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, before the status is written
        return real_end(*args, **kwargs)

    previous = signal.signal(signal.SIGTERM, distributed._terminate)
    monkeypatch.setattr(mlflow, "end_run", end_run_hit_by_sigterm)
    try:
        with pytest.raises(RuntimeError, match="peer"):
            with tracking.start("ingredient", "sigterm") as run:
                raise RuntimeError("Connection closed by peer")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert mlflow.MlflowClient().get_run(run.id).info.status == "FAILED"
