"""``python -m chameleon_core params``: the trainable parameters of each regime, consistent across regimes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chameleon_core import REGIMES
from chameleon_core.cli import _train_config, build_parser, main
from chameleon_core.models import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
from conftest import edit_config


def test_params_at_gpt2_small_shape_in_a_subprocess():
    done = subprocess.run(
        [sys.executable, "-m", "chameleon_core", "params", "--model", "random:gpt2", "--rank", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    result = json.loads(done.stdout)
    assert result["base_parameters"] == 124_439_808
    assert result["regimes"]["chameleon"]["head"] == 6_786_596
    assert result["regimes"]["lora-head"]["trainable"] == 204_100
    # the published ChameleonLLM row: the hyper-LoRA head alone, no layer LoRA
    assert result["regimes"]["chameleon-head"] == {"trainable": 6_786_596, "head": 6_786_596, "layers": 0, "lora_rank": 4}
    per_block = (768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768)  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert result["regimes"]["lora"]["layers"] == 4 * 12 * per_block == 589_824


@pytest.mark.parametrize("model", ["random:tiny-gpt2", "random:tiny-llama"])
def test_params_are_consistent_across_regimes(model, capsys):
    assert main(["params", "--model", model, "--rank", "4"]) == 0
    regimes = json.loads(capsys.readouterr().out)["regimes"]
    assert list(regimes) == list(REGIMES)
    assert regimes["base"] == {"trainable": 0}
    head, layers = regimes["lora-head"]["head"], regimes["lora"]["layers"]
    assert regimes["lora-head"] == {"trainable": head, "head": head, "layers": 0, "lora_rank": 4}
    assert regimes["lora"]["trainable"] == layers + head and regimes["lora"]["head"] == head
    assert regimes["chameleon"]["layers"] == layers
    d = 64  # both tiny models; hyper d -> 64 -> 32 -> r (d + V): 32 weights + 1 bias per static-head parameter
    assert regimes["chameleon"]["head"] == (d * 64 + 64) + (64 * 32 + 32) + 33 * head
    unit = (layers + head) // 4  # trainable parameters per unit of static rank
    matched = regimes["lora-matched"]
    assert matched["trainable"] == matched["lora_rank"] * unit
    assert abs(matched["trainable"] - regimes["chameleon"]["trainable"]) <= unit / 2  # the closest rank
    # the published configuration's twins: no layer LoRA; matched to it, its constant input, one head LoRA per cluster
    twin = regimes["lora-head-matched"]
    assert twin["layers"] == 0 and twin["trainable"] == twin["lora_rank"] * (head // 4)
    assert abs(twin["trainable"] - regimes["chameleon-head"]["trainable"]) <= head // 8
    assert regimes["chameleon-head-constant"]["trainable"] == regimes["chameleon-head"]["trainable"] + d
    assert regimes["lora-head-per-cluster"] == {"trainable": head, "head": head, "layers": 0, "lora_rank": 4, "k": 1}


def one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a refusal: exit code 2 and exactly one ``error:`` line, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def saved_bundle(folder: Path, regime: str = "chameleon", train_settings: bool = True) -> Path:
    """A bundle on ``random:tiny-gpt2`` as ``train`` writes it (``train_settings``: with ``metadata.train``)."""
    from dataclasses import asdict

    from chameleon_core import apply_regime, load_model, save_bundle
    from chameleon_core.regimes import AdapterConfig
    from chameleon_core.train import TrainConfig

    model, tokenizer = load_model("random:tiny-gpt2", device="cpu")
    adapter = apply_regime(model, AdapterConfig(regime, rank=4)).config
    config = TrainConfig(regime=regime, max_length=48, max_eval_rows=16, batch_size=8, device="cpu")
    return save_bundle(folder, model, tokenizer, adapter, metadata={"train": asdict(config)} if train_settings else {})


def test_train_into_a_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    line = one_error_line(capsys, ["train", "--model", "random:tiny-gpt2", "--out", str(tmp_path / "notes.txt")])
    assert "is a file" in line and (tmp_path / "notes.txt").read_text() == "keep me"


def test_train_into_a_finished_run_needs_overwrite(tmp_path, capsys):
    saved_bundle(tmp_path / "run")
    line = one_error_line(capsys, ["train", "--model", "random:tiny-gpt2", "--out", str(tmp_path / "run")])
    assert "already holds a bundle (config.json); pass --overwrite" in line


def test_evaluate_a_bundle_without_training_settings_is_one_error_line(tmp_path, capsys):
    line = one_error_line(capsys, ["evaluate", "--bundle", str(saved_bundle(tmp_path / "b", train_settings=False))])
    assert "records no training configuration (metadata.train)" in line


def test_evaluate_a_chameleon_bundle_without_clusters_is_refused(tmp_path, capsys):
    path = saved_bundle(tmp_path / "b")  # saved without clusters
    line = one_error_line(capsys, ["evaluate", "--bundle", str(path), "--device", "cpu"])
    assert "holds no clusters (clusters.safetensors)" in line and "conditioned on each batch" in line


def test_evaluate_a_static_bundle_without_clusters_under_the_causal_protocol(tmp_path, capsys):
    """Static LoRA's per-token loss does not depend on how rows are batched: no clusters needed."""
    path = saved_bundle(tmp_path / "b", regime="lora")
    assert main(["evaluate", "--bundle", str(path), "--device", "cpu", "--max-eval-rows", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 16


@pytest.mark.parametrize(
    "change, message",
    [({"rank": "eight"}, "adapter config field 'rank' must be an integer, got 'eight'"),
     ({"alpha": 1e308}, "alpha must be a finite number > 0 with scale alpha / rank at most 1000 (at rank 4: 0 < alpha "
                        "<= 4000), got 1e+308")],
    ids=["mistyped-rank", "overflowing-alpha"],
)
def test_a_bundle_with_an_unusable_setting_is_one_error_line(tmp_path, capsys, change, message):
    path = saved_bundle(tmp_path / "b")
    edit_config(path, lambda config: config["adapter"].update(change))
    for command in (["evaluate", "--device", "cpu"], ["generate", "--prompt", "hi"]):
        assert message in one_error_line(capsys, [*command, "--bundle", str(path)])


def refuse_models(monkeypatch) -> None:
    """Fail on any model loading: a refusal must come before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    for module in ("train", "bundle"):
        monkeypatch.setattr(f"chameleon_core.{module}.load_model", refuse)


@pytest.mark.parametrize(
    "flags, message",
    [(["--device", "bogus"], "unknown device 'bogus'; choose auto, cpu, cuda, cuda:N or mps"),
     (["--context-tokens", "0"], "context_tokens (--context-tokens) must be an integer >= 1, got 0"),
     (["--max-train-rows", "0"], "max_train_rows (--max-train-rows) must be an integer >= 1, or unset (all), got 0"),
     (["--max-eval-rows", "0"], "max_eval_rows (--max-eval-rows) must be an integer >= 1, or unset (all), got 0"),
     (["--max-eval-rows", "-5"], "max_eval_rows (--max-eval-rows) must be an integer >= 1, or unset (all), got -5"),
     (["--alpha", "nan"], "alpha must be a finite number > 0 with scale alpha / rank at most 1000"),
     (["--alpha", "inf"], "alpha must be a finite number > 0 with scale alpha / rank at most 1000"),
     (["--alpha", "0"], "alpha must be a finite number > 0 with scale alpha / rank at most 1000"),
     (["--lr", "inf"], "lr (--lr) must be a finite number > 0, got inf"),
     (["--lr", "nan"], "lr (--lr) must be a finite number > 0, got nan"),
     (["--seed", "-1"], "seed (--seed) must be an integer from 0 to 2**32 - 1, got -1"),
     (["--selection-rows", "0"], "selection_rows (--selection-rows) must be an integer >= 1, or unset"),
     (["--selection-rows", "64", "--max-train-rows", "64"],
      "selection_rows (--selection-rows) 64 leaves 0 of the 64 training rows to train on; it must leave at least one")],
    ids=["device", "context-tokens-0", "train-rows-0", "eval-rows-0", "eval-rows-negative", "alpha-nan", "alpha-inf",
         "alpha-0", "lr-inf", "lr-nan", "seed-negative", "selection-rows-0", "selection-rows-all"],
)
def test_train_refuses_a_meaningless_setting_before_any_work(tmp_path, capsys, monkeypatch, flags, message):
    refuse_models(monkeypatch)
    line = one_error_line(capsys, ["train", "--model", "random:tiny-gpt2", "--out", str(tmp_path / "run"), *flags])
    assert message in line and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_gpu_asked_for_and_missing_is_refused(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # as on a machine without a GPU
    refuse_models(monkeypatch)
    argv = {"train": ["train", "--model", "random:tiny-gpt2", "--out", str(tmp_path / "run")],
            "evaluate": ["evaluate", "--bundle", str(saved_bundle(tmp_path / "b"))]}[command]
    line = one_error_line(capsys, [*argv, "--device", "cuda"])
    assert "device 'cuda' was asked for, but this machine has no CUDA GPU that torch can use" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rows", ["0", "-5"])
def test_evaluate_refuses_a_meaningless_row_count(tmp_path, capsys, monkeypatch, rows):
    path = saved_bundle(tmp_path / "b")
    refuse_models(monkeypatch)
    line = one_error_line(capsys, ["evaluate", "--bundle", str(path), "--device", "cpu", "--max-eval-rows", rows])
    assert f"max_eval_rows (--max-eval-rows) must be an integer >= 1, or unset (all), got {rows}" in line


@pytest.mark.parametrize("state", ["no-config", "no-folder"])
def test_generate_on_a_folder_that_is_no_bundle_says_what_one_holds(tmp_path, capsys, state):
    path = saved_bundle(tmp_path / "b")
    if state == "no-config":
        (path / "config.json").unlink()
    line = one_error_line(capsys, ["generate", "--prompt", "hi", "--bundle", str(path if state == "no-config" else tmp_path / "x")])
    reason = "it holds no config.json" if state == "no-config" else "the folder does not exist"
    assert f"is neither a bundle nor a bundle set ({reason}; a bundle holds config.json, a bundle set a lora/ and" in line


def readme_copy(folder: Path) -> Path:
    """A copy of the README, with its generated blocks, to run ``report`` on."""
    copy = folder / "README.md"
    copy.write_text((ROOT / "README.md").read_text())
    return copy


@pytest.mark.parametrize("bundles", ["missing", "empty"])
def test_report_without_bundle_sets_refuses_and_keeps_the_readme(tmp_path, capsys, bundles):
    readme, folder = readme_copy(tmp_path), tmp_path / "bundles"
    if bundles == "empty":
        folder.mkdir()
    line = one_error_line(capsys, ["report", str(ROOT / "assets" / "results"), "--readme", str(readme), "--bundles", str(folder)])
    assert f"no bundle set (*/chameleon/config.json) under {folder}" in line and "README.md was not changed" in line
    assert readme.read_text() == (ROOT / "README.md").read_text()
    assert not list(tmp_path.glob("README.md.*"))  # no temporary file left behind


def test_report_on_results_without_setup_names_the_file_and_keeps_the_readme(tmp_path, capsys):
    readme, results = readme_copy(tmp_path), tmp_path / "results" / "run" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"protocols": {}}))
    line = one_error_line(capsys, ["report", str(tmp_path / "results"), "--readme", str(readme)])
    assert f"{results} is not a results file written by `python -m chameleon_core reproduce`: it needs \"setup\"" in line
    assert readme.read_text() == (ROOT / "README.md").read_text()


def test_alpaca_file_of_numbers_is_one_error_line(tmp_path, capsys):
    (tmp_path / "alpaca.json").write_text("[1, 2, 3]")
    line = one_error_line(capsys, ["train", "--model", "random:tiny-gpt2", "--dataset", "alpaca", "--data-dir",
                                   str(tmp_path / "alpaca.json"), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert "record 0 of" in line and "not an object" in line


def test_an_os_error_while_loading_a_model_is_one_error_line(monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr("chameleon_core.cli.load_model", offline)
    line = one_error_line(capsys, ["params", "--model", "someone/some-model"])
    assert line == "error: We couldn't connect to 'https://huggingface.co' to load the files. Check your connection."


@pytest.mark.parametrize("command", [None, "params", "train", "evaluate", "reproduce", "report", "generate", "bench"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"] if command else ["--help"])
    assert done.value.code == 0 and "usage: python -m chameleon_core" in capsys.readouterr().out


def test_one_set_of_defaults():
    """Options left out keep TrainConfig's defaults, except the model; every --device defaults to auto."""
    from dataclasses import replace

    from chameleon_core.train import TrainConfig

    parse = build_parser().parse_args
    assert _train_config(parse(["train", "--out", "run"])) == replace(TrainConfig(), model=DEFAULT_MODEL)
    given = _train_config(parse(["train", "--out", "run", "--lr", "0.01", "--k", "4", "--protocol", "paper"]))
    assert (given.lr, given.k, given.protocol, given.epochs) == (0.01, 4, "paper", TrainConfig().epochs)
    assert parse(["params"]).model == DEFAULT_MODEL
    assert parse(["evaluate", "--bundle", "b"]).device == parse(["bench"]).device == "auto"


@pytest.mark.parametrize(
    "argv, expected",
    [([], {"model": DEFAULT_MODEL, "epochs": 3}),
     (["--preset", "tiny"], {"model": "random:tiny-gpt2", "max_train_rows": 600, "epochs": 2}),
     (["--preset", "tiny", "--epochs", "1"], {"model": "random:tiny-gpt2", "epochs": 1}),
     (["--preset", "paper"], {"model": "gpt2", "dataset": "wikitext", "max_length": 256, "epochs": 10}),
     (["--profile", "paper", "--dataset", "alpaca"], {"model": "gpt2", "dataset": "alpaca", "max_length": 512})],
)
def test_reproduce_starts_from_its_preset(tmp_path, monkeypatch, capsys, argv, expected):
    calls = []
    monkeypatch.setattr("chameleon_core.cli.reproduce", lambda config, out, *args, **kwargs: calls.append(config))
    monkeypatch.setattr("chameleon_core.cli.results_markdown", lambda results: "")
    assert main(["reproduce", "--out", str(tmp_path), "--collect-only", *argv]) == 0
    assert {key: getattr(calls[0], key) for key in expected} == expected


def test_share_bundle_writes_a_half_precision_copy_and_refuses_an_existing_folder(tmp_path, capsys):
    from chameleon_core import AdapterConfig, apply_regime, load_model, save_bundle

    model, tokenizer = load_model("random:tiny-gpt2")
    save_bundle(tmp_path / "run", model, tokenizer, apply_regime(model, AdapterConfig(regime="lora")).config)
    assert main(["share-bundle", "--bundle", str(tmp_path / "run"), "--out", str(tmp_path / "shared")]) == 0
    assert json.loads(capsys.readouterr().out)["bundle"] == str(tmp_path / "shared")
    assert not (tmp_path / "shared" / "tokenizer").exists()
    assert main(["share-bundle", "--bundle", str(tmp_path / "run"), "--out", str(tmp_path / "shared")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and err.count("\n") == 1


def test_a_bundle_naming_an_unreachable_hub_model_is_one_error_line(tmp_path, capsys, offline):
    path = saved_bundle(tmp_path / "b")
    edit_config(path, lambda config: config.update(base_model="someone/not-on-this-machine"))
    line = one_error_line(capsys, ["evaluate", "--bundle", str(path), "--device", "cpu"])
    assert "could not load model 'someone/not-on-this-machine'" in line and "hub could not provide it" in line


def test_an_unknown_model_name_offline_is_one_error_line(capsys, offline):
    line = one_error_line(capsys, ["params", "--model", "no-such-model-xyz"])
    assert "could not load model 'no-such-model-xyz'" in line


@pytest.mark.parametrize(
    "flags, message",
    [(["--lr-grid", "1e-3,3e-3"], "--lr-grid chooses each run's learning rate on selection rows carved from the "
                                  "training rows; pass --selection-rows"),
     (["--lr-grid", "1e-3", "--selection-rows", "8"], "--lr-grid needs at least 2 learning rates to choose from, got 1"),
     (["--lr-grid", "1e-3,0", "--selection-rows", "8"], "--lr-grid values must be finite numbers > 0, got 0.0"),
     (["--lr-grid", "1e-3,inf", "--selection-rows", "8"], "--lr-grid values must be finite numbers > 0, got inf"),
     (["--lr-grid", "1e-3,0.001", "--selection-rows", "8"], "--lr-grid names a learning rate twice: 0.001, 0.001")],
    ids=["no-selection-rows", "one-value", "zero", "inf", "twice"],
)
def test_reproduce_refuses_a_learning_rate_grid_it_cannot_choose_from_fairly(tmp_path, capsys, monkeypatch, flags, message):
    refuse_models(monkeypatch)
    line = one_error_line(capsys, ["reproduce", "--preset", "tiny", "--out", str(tmp_path / "out"), *flags])
    assert message in line and not (tmp_path / "out").exists()


def test_reproduce_passes_its_learning_rate_grid_and_refuses_one_that_is_not_numbers(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr("chameleon_core.cli.reproduce", lambda config, out, *args, **kwargs: calls.append((config, kwargs)))
    monkeypatch.setattr("chameleon_core.cli.results_markdown", lambda results: "")
    assert main(["reproduce", "--out", str(tmp_path), "--lr-grid", "3e-4,1e-3,3e-3", "--selection-rows", "40"]) == 0
    config, kwargs = calls[0]
    assert kwargs["lr_grid"] == [3e-4, 1e-3, 3e-3] and config.selection_rows == 40
    with pytest.raises(SystemExit):
        main(["reproduce", "--out", str(tmp_path), "--lr-grid", "3e-4,fast"])
    assert "comma-separated learning rates are needed, e.g. 3e-4,1e-3,3e-3; got '3e-4,fast'" in capsys.readouterr().err
