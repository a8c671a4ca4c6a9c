"""Training: losses drop, runs resume to identical metrics, batches shard, bundles evaluate the same."""

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from chameleon_core.bundle import load_bundle
from chameleon_core.models import load_model
from chameleon_core.cli import main
from chameleon_core.protocols import PROTOCOLS, CausalProtocol
from chameleon_core.train import TrainConfig, TrainingDiverged, batches, prepare, train

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


def test_two_processes_share_each_epoch_and_end_with_one_trained_run(tmp_path):
    """``torchrun --nproc_per_node 2 -m chameleon_core train`` (accelerate reads torchrun's environment): each
    process takes every other cluster batch, so an epoch is half the optimizer steps of one process, each the mean
    gradient of two batches; the main process writes the run, and it trains as one process does."""
    flags = ["--model", "random:tiny-gpt2", "--dataset", "synthetic", "--regime", "chameleon", "--epochs", "2",
             "--lr", "1e-2", "--max-length", "48", "--max-train-rows", "64", "--max-eval-rows", "16", "--batch-size", "8"]
    one = train(TrainConfig(model="random:tiny-gpt2", dataset="synthetic", regime="chameleon", epochs=2, lr=1e-2,
                            max_length=48, max_train_rows=64, max_eval_rows=16, batch_size=8), tmp_path / "one",
                show_progress=False)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "chameleon_core",
                           "train", *flags, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["complete"] and 2 * two["steps"] == one["steps"]  # every batch once per epoch, shared by two
    assert two["history"][-1]["val_loss"] < two["history"][0]["step_losses"][0]  # it trained
    assert abs(two["eval"]["loss"] - one["eval"]["loss"]) < 0.5  # about where one process ends
    assert load_bundle(tmp_path / "two").adapter == load_bundle(tmp_path / "one").adapter


def test_the_shuffled_condition_is_always_another_clusters_centroid(monkeypatch):
    """"Another cluster's adapter" (README's finding) rests on this: every evaluated batch is conditioned on the
    centroid of a cluster that is not its own, drawn at random."""
    from chameleon_core import train as train_module

    model, tok = load_model("random:tiny-gpt2")
    config = TrainConfig(**TINY, regime="chameleon")
    train_split, _, test_split, clusters, _ = prepare(config, model, tok)
    used = []  # (the batch's own cluster, the cluster whose centroid conditioned it)
    real = train_module._conditioned

    def spy(model, split, idx, config, clusters, cond=None):
        own = int(clusters.assign(split.encoded.embeddings[idx].mean(0, keepdim=True))[0])
        used.append((own, int(clusters.assign(cond[:1])[0])))
        return real(model, split, idx, config, clusters, cond)

    monkeypatch.setattr(train_module, "_conditioned", spy)
    for split in (train_split, test_split):
        train_module.evaluate(model, split, config, clusters, tok.pad_token_id, shuffle_condition=True)
    assert clusters.k > 2 and len(used) > clusters.k
    assert all(own != other for own, other in used)
    assert len({other for _, other in used}) > 1  # drawn, not one fixed cluster


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


class BatchMeanCausal(CausalProtocol):
    """A third protocol, defined only here: causal scoring, the split's loss a mean of per-batch means, and
    the evaluation split clustered on itself."""

    name = "batch-mean-causal"
    transductive = True
    loss_depends_on_batches = True

    def split_loss(self, sums: list[float], counts: list[int]) -> float:
        return sum(s / n for s, n in zip(sums, counts)) / len(sums)


@pytest.mark.parametrize("protocol, k", [("causal", None), ("paper", 3), (BatchMeanCausal.name, 3)])
def test_evaluate_prepares_the_split_as_training_did(tmp_path, monkeypatch, capsys, protocol, k):
    """``evaluate`` on a run's bundle gives the run's final eval: the same rows and batches, the transductive
    k included. The third protocol is one registered class: training, evaluation and the CLI need no change."""
    monkeypatch.setitem(PROTOCOLS, BatchMeanCausal.name, BatchMeanCausal())
    run = tmp_path / "run"
    assert main(["train", "--model", "random:tiny-gpt2", "--dataset", "synthetic", "--max-length", "64",
                 "--max-train-rows", "64", "--batch-size", "16", "--epochs", "1", "--protocol", protocol,
                 "--device", "cpu", "--out", str(run), *(["--k", str(k)] if k else [])]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--bundle", str(run), "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert (evaluated["protocol"], evaluated["split"]) == (protocol, trained["eval_split"])
    assert evaluated["targets"] == trained["eval"]["targets"]
    assert evaluated["loss"] == pytest.approx(trained["eval"]["loss"], rel=1e-6)


@pytest.fixture
def no_model(monkeypatch):
    """Fail on any model loading: the refusals below must come before loading or training anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the run folder was checked")

    monkeypatch.setattr("chameleon_core.train.load_model", refuse)


def finished(folder, config: TrainConfig) -> dict:
    """A folder holding a finished run of ``config`` (its metrics are all the checks read)."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {"config": json.loads(json.dumps(asdict(config))), "complete": True, "eval": {"loss": 1.5}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def test_resume_refuses_a_finished_run_of_another_configuration_naming_what_differs(tmp_path, no_model):
    recorded = TrainConfig(**{**TINY, "batch_size": 1000})
    metrics = finished(tmp_path / "run", recorded)
    assert train(recorded, tmp_path / "run", resume=True) == metrics  # the same configuration: returned as it is
    changed = TrainConfig(**{**TINY, "lr": 0.01, "batch_size": 32})
    with pytest.raises(ValueError, match=r"different configuration \(a finished run \(metrics.json\): "
                                         r"lr: 0.0005 -> 0.01, batch_size: 1000 -> 32\)"):
        train(changed, tmp_path / "run", resume=True)


def test_resume_refuses_a_checkpoint_of_another_configuration_before_loading(tmp_path, no_model):
    (tmp_path / "run").mkdir()
    torch.save({"config": asdict(TrainConfig(**TINY, regime="lora"))}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"an unfinished run \(checkpoint.pt\): regime: 'lora' -> 'chameleon'\)"):
        train(TrainConfig(**TINY, regime="chameleon"), tmp_path / "run", resume=True)


@pytest.mark.parametrize("held", ["finished", "checkpoint"])
def test_a_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path, no_model, held):
    config = TrainConfig(**TINY)
    if held == "finished":
        finished(tmp_path / "run", config)
    else:
        (tmp_path / "run").mkdir()
        torch.save({"config": asdict(config)}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match="already holds .*; pass --overwrite to replace it, --resume to continue it"):
        train(config, tmp_path / "run")
    with pytest.raises(ValueError, match="pass one of them"):
        train(config, tmp_path / "run", resume=True, overwrite=True)


def test_overwrite_replaces_a_finished_run(tmp_path):
    finished(tmp_path / "run", TrainConfig(**{**TINY, "lr": 0.01}))
    config = TrainConfig(**{**TINY, "max_train_rows": 48, "max_eval_rows": 16, "max_length": 48}, regime="lora", epochs=1)
    result = train(config, tmp_path / "run", overwrite=True, show_progress=False)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["config"] == result["config"] == json.loads(json.dumps(asdict(config)))
    assert train(config, tmp_path / "run", resume=True) == json.loads((tmp_path / "run" / "metrics.json").read_text())


@pytest.mark.parametrize(
    "where, message",
    [("file", "is a file; choose a folder"), ("under-file", "lies under .*a.txt, which is a file"),
     ("too-long", "cannot create the run folder .*File name too long")],
)
def test_an_unusable_out_is_refused_before_loading(tmp_path, no_model, where, message):
    (tmp_path / "a.txt").write_text("notes")
    out = {"file": tmp_path / "a.txt", "under-file": tmp_path / "a.txt" / "run", "too-long": tmp_path / ("x" * 300)}[where]
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**TINY), out)
    assert (tmp_path / "a.txt").read_text() == "notes"


def test_a_demo_set_is_built_from_the_loaded_base_model_which_stays_unadapted(tmp_path, monkeypatch):
    """open_bundle_set loads the base once and hands it to the build: no run loads it again or changes it."""
    from chameleon_core import bundle_set as bundle_sets, train as train_module

    model, tokenizer = load_model("random:tiny-gpt2")
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded again")

    monkeypatch.setattr(train_module, "load_model", refuse)
    settings = {**bundle_sets.DEMO_SETTINGS, "max_train_rows": 48, "max_eval_rows": 16, "max_length": 48, "epochs": 1}
    built = bundle_sets.build_bundle_set("random:tiny-gpt2", tmp_path / "set", settings=settings, base=(model, tokenizer))
    assert {p.name for p in built.iterdir()} >= {"lora", "chameleon"}
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], value) for name, value in before.items())


def test_a_loss_that_becomes_non_finite_stops_the_run_instead_of_finishing_it(tmp_path):
    """A finite but absurd learning rate blows the adapters up within a few steps: the run must not be marked complete."""
    config = TrainConfig(**TINY, regime="lora", epochs=1, lr=1e30)
    with pytest.raises(TrainingDiverged, match=r"training stopped at epoch 1, step \d+: the loss became (nan|inf) "
                                               r"\(lr 1e\+30, alpha 4\); nothing was saved as finished"):
        train(config, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "config.json").exists()


def test_every_evaluation_saves_per_row_losses_that_add_up_to_the_split_loss(tmp_path):
    result = train(TrainConfig(**TINY, regime="chameleon", epochs=1), tmp_path / "run", show_progress=False)
    saved = json.loads((tmp_path / "run" / "rows.json").read_text())
    assert set(saved) == {"eval", "eval_shuffled_condition"} and "per_row" not in result["eval"]
    for key in saved:
        rows = saved[key]
        assert len(rows["keys"]) == len(rows["loss"]) == len(rows["targets"]) == result[key]["rows"]
        assert sum(rows["targets"]) == result[key]["targets"]
        assert sum(rows["loss"]) / sum(rows["targets"]) == pytest.approx(result[key]["loss"], rel=1e-5)
    assert saved["eval"]["keys"] == saved["eval_shuffled_condition"]["keys"]  # the same rows, pairable
    assert saved["eval"]["loss"] != saved["eval_shuffled_condition"]["loss"]


def test_patience_stops_when_validation_stops_improving_and_keeps_the_best_epoch(tmp_path, monkeypatch):
    import chameleon_core.train as training

    two_epochs = train(TrainConfig(**TINY, regime="lora", epochs=2), tmp_path / "two", show_progress=False)
    real, losses = training.evaluate, iter([3.0, 2.0, 2.5, 2.6, 1.0, 1.0])  # validation improves, then stops

    def scripted(model, split, *args, **kwargs):
        result = real(model, split, *args, **kwargs)
        return {**result, "loss": next(losses)} if split.name == "validation" else result

    monkeypatch.setattr(training, "evaluate", scripted)
    result = train(TrainConfig(**TINY, regime="lora", epochs=6, patience=2), tmp_path / "run", show_progress=False)
    assert [h["val_loss"] for h in result["history"]] == [3.0, 2.0, 2.5, 2.6]  # two epochs without a better loss
    assert result["best_epoch"] == 2 and result["steps"] == 4 * len(result["history"][0]["step_losses"])
    assert result["eval"]["loss"] == pytest.approx(two_epochs["eval"]["loss"], abs=1e-6)  # epoch 2's adapters, kept
    with pytest.raises(ValueError, match=r"patience \(--patience\) must be an integer >= 1"):
        TrainConfig(patience=0)


def test_selection_rows_are_carved_from_the_training_rows_seeded_by_the_data_seed(tmp_path):
    from chameleon_core.data import load_dataset_splits
    from chameleon_core.train import selection_split

    records = load_dataset_splits("synthetic", seed=0)["train"][:100]
    kept, carved = selection_split(records, TrainConfig(**TINY, selection_rows=20))
    assert len(carved) == 20 and len(kept) == 80
    assert sorted(map(id, kept + carved)) == sorted(map(id, records))  # every row once: none trained and held out
    assert [r.text for r in carved] == [r.text for r in selection_split(records, TrainConfig(**TINY, selection_rows=20, seed=7))[1]]
    other = selection_split(records, TrainConfig(**TINY, selection_rows=20, data_seed=1))[1]
    assert {id(r) for r in other} != {id(r) for r in carved}  # another data seed, other rows
    assert selection_split(records, TrainConfig(**TINY)) == (records, [])
    with pytest.raises(ValueError, match=r"selection_rows \(--selection-rows\) 100 leaves 0 of the 100 training rows"):
        selection_split(records, TrainConfig(**TINY, selection_rows=100))
    with pytest.raises(ValueError, match=r"must be an integer >= 1, or unset"):
        TrainConfig(**TINY, selection_rows=0)

    model, tok = load_model("random:tiny-gpt2")
    train_split, selection, test_split, clusters, info = prepare(TrainConfig(**TINY, selection_rows=32), model, tok)
    assert selection.name == "selection" and info["rows"] == {"train": 160, "selection": 32, "test": 48}
    assert not set(train_split.encoded.texts) & set(selection.encoded.texts)  # disjoint from the rows trained on
    assert len(selection.labels) == 32 and int(selection.labels.max()) < clusters.k  # labelled like a held-out split
    unset = prepare(TrainConfig(**TINY), model, tok)
    assert unset[1].name == "validation" and "selection" not in unset[4]["rows"] and unset[4]["rows"]["train"] == 192


def test_epochs_are_validated_on_the_selection_rows_and_the_reported_split_is_scored_once(tmp_path, monkeypatch):
    import chameleon_core.train as training

    real, losses, scored = training.evaluate, iter([3.0, 2.0, 2.5, 2.6, 1.0, 1.0]), []

    def scripted(model, split, *args, **kwargs):
        scored.append((split.name, kwargs.get("shuffle_condition", False)))
        result = real(model, split, *args, **kwargs)
        return {**result, "loss": next(losses)} if split.name == "selection" else result

    monkeypatch.setattr(training, "evaluate", scripted)
    config = TrainConfig(**TINY, regime="chameleon", epochs=6, patience=2, selection_rows=32)
    result = train(config, tmp_path / "run", show_progress=False)
    assert [h["val_loss"] for h in result["history"]] == [3.0, 2.0, 2.5, 2.6]  # early stopping read the selection rows
    assert result["best_epoch"] == 2 and result["selection"] is True and result["rows"]["selection"] == 32
    assert scored == [("selection", False)] * 4 + [("test", False), ("test", True)]  # the reported split once, at the end
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["rows"]["selection"] == 32 and saved["config"]["selection_rows"] == 32


def test_a_run_recorded_before_selection_rows_existed_still_resumes(tmp_path, no_model):
    recorded = finished(tmp_path / "run", TrainConfig(**TINY))
    del recorded["config"]["selection_rows"]
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(recorded))
    assert train(TrainConfig(**TINY), tmp_path / "run", resume=True) == recorded
    with pytest.raises(ValueError, match=r"selection_rows: None -> 8"):
        train(TrainConfig(**TINY, selection_rows=8), tmp_path / "run", resume=True)
