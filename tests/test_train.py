"""Training: losses drop, runs resume to identical metrics, batches shard, bundles evaluate the same."""

import json
import subprocess
import sys

import pytest

from chameleon_core.bundle import load_bundle
from chameleon_core.train import TrainConfig, batches, prepare, train

TINY = dict(model="random:tiny-gpt2", dataset="synthetic", max_length=96, max_train_rows=192, max_eval_rows=48, batch_size=16)


@pytest.mark.parametrize("regime", ["lora", "chameleon"])
def test_training_lowers_the_causal_loss(tmp_path, regime):
    base = train(TrainConfig(**TINY, regime="base", epochs=0), tmp_path / "base", show_progress=False)
    result = train(TrainConfig(**TINY, regime=regime, epochs=2, lr=3e-3), tmp_path / regime, show_progress=False)
    assert result["eval"]["loss"] < base["eval"]["loss"] - 0.1
    assert result["history"][1]["train_loss"] < result["history"][0]["train_loss"]


def test_resumed_run_ends_with_the_same_metrics(tmp_path):
    config = TrainConfig(**TINY, regime="chameleon", epochs=2)
    straight = train(config, tmp_path / "straight", show_progress=False)

    class Interrupted(Exception):
        pass

    def stop_in_second_epoch(fraction, message):
        if message.startswith("epoch 2/2"):
            raise Interrupted

    with pytest.raises(Interrupted):
        train(config, tmp_path / "resumed", progress=stop_in_second_epoch, show_progress=False)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    resumed = train(config, tmp_path / "resumed", resume=True, show_progress=False)
    assert resumed["eval"] == straight["eval"]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    config = TrainConfig(**TINY, regime="lora", epochs=2)

    def stop(fraction, message):
        if message.startswith("epoch 2/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "run", progress=stop, show_progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        train(TrainConfig(**{**TINY, "lr": 1e-3}, regime="lora", epochs=2), tmp_path / "run", resume=True, show_progress=False)


def test_batches_are_cluster_homogeneous_and_shard_across_processes():
    from chameleon_core.models import load_model

    model, tok = load_model("random:tiny-gpt2")
    config = TrainConfig(**TINY)
    train_split, _, _, _, _ = prepare(config, model, tok)
    single = batches(train_split, config, seed=3, epoch=1)
    assert all(len(set(train_split.labels[b].tolist())) == 1 for b in single)
    assert sorted(i for b in single for i in b) == list(range(len(train_split.encoded)))
    shards = [batches(train_split, config, seed=3, epoch=1, rank=r, replicas=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    assert {tuple(b) for s in shards for b in s} == {tuple(b) for b in single}


def test_bundle_written_by_training_evaluates_to_the_same_loss(tmp_path):
    result = train(TrainConfig(**TINY, regime="chameleon", epochs=1), tmp_path / "run", show_progress=False)
    bundle = load_bundle(tmp_path / "run")
    assert bundle.adapter.regime == "chameleon" and bundle.clusters.k == result["k"]
    assert len(bundle.points.texts) == len(bundle.points.labels) == result["rows"]["train"]
    out = subprocess.run(
        [sys.executable, "-m", "chameleon_core", "evaluate", "--bundle", str(tmp_path / "run"), "--device", "cpu",
         "--max-eval-rows", "48"],
        capture_output=True, text=True, check=True,
    )
    evaluated = json.loads(out.stdout)
    assert evaluated["split"] == result["eval_split"]
    assert evaluated["loss"] == pytest.approx(result["eval"]["loss"], rel=1e-5)
