"""The ``python -m chameleon_core`` commands: their options, defaults and handlers, in one place.

The domain modules take typed parameters (a :class:`TrainConfig`, :class:`BenchSettings`, plain
arguments); each handler here turns parsed options into one such call. Defaults are not repeated:
an option left out is None and keeps the default of what it fills (:data:`TRAIN_DEFAULTS`,
``BenchSettings``), and every command that takes a model defaults to ``models.DEFAULT_MODEL``
unless its help says why not.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from .bench import SECTIONS, BenchSettings, merge_runs, run_bench
from .bundle import BundleError, export_bundle_peft, fetch_bundle, load_bundle, read_bundle_config, share_bundle
from .card import write_model_card
from .bundle_set import open_bundle_set
from .inference import (
    CLUSTER_SOURCES, MAX_NEW_TOKENS, MAX_PROMPTS, Request, answer_stops, assign, embed_prompts, fit_prompts, generate,
    validate_prompts,
)
from .data import DATASETS
from .embeddings import CONDITION_SOURCES
from .hyper_head import CONDITIONING, HYPER_INITS
from .lora import LORA_INITS
from .models import DEFAULT_MODEL, MODEL_HELP, load_model
from .protocols import PROTOCOLS
from .regimes import REGIMES, ROUTED, AdapterConfig, apply_regime, trainable_parameters
from .report import format_report, write_readme
from .reproduce import GRIDS, PRESETS, preset_settings, reproduce, results_markdown
from .train import SAMPLERS, TrainConfig, evaluate_bundle, train

# What a command line trains with where an option is left out: TrainConfig's defaults, but the default model.
TRAIN_DEFAULTS = {**asdict(TrainConfig()), "model": DEFAULT_MODEL}
DEVICE_HELP = "auto, cpu, cuda, mps"


def params(args: argparse.Namespace) -> dict:
    """Trainable parameters of every regime on one base model, counted on real modules."""
    base, _ = load_model(args.model, tokenizer=args.tokenizer)
    result = {"model": args.model, "rank": args.rank, "base_parameters": sum(p.numel() for p in base.parameters())}
    regimes = {}
    for regime in REGIMES:
        model = copy.deepcopy(base)
        report = apply_regime(model, AdapterConfig(regime=regime, rank=args.rank, k=args.k))
        entry = {"trainable": trainable_parameters(model)}
        if regime != "base":
            entry["head"] = trainable_parameters(model.get_submodule(report.head_module))
            entry["layers"] = entry["trainable"] - entry["head"]
            entry["lora_rank"] = report.config.lora_rank
        if regime in ROUTED:
            entry["k"] = report.config.k
        regimes[regime] = entry
    result["regimes"] = regimes
    return result


def _setting(parser: argparse.ArgumentParser, name: str, about: str | None = None, **kwargs) -> None:
    """``--name`` for the TrainConfig field ``name``, None when left out (see :func:`_train_config`)."""
    about = about or f"default: {TRAIN_DEFAULTS[name]}"
    parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=about, **kwargs)


def _add_training_settings(parser: argparse.ArgumentParser) -> None:
    """The TrainConfig fields that ``train`` and ``reproduce`` share (``reproduce`` varies the others)."""
    _setting(parser, "model", MODEL_HELP)
    _setting(parser, "dataset", choices=DATASETS)
    _setting(parser, "data_dir", "local data (WikiText folder or Alpaca .json); default: the hub")
    _setting(parser, "epochs", type=int)
    _setting(parser, "lr", type=float)
    _setting(parser, "batch_size", type=int)
    _setting(parser, "rank", type=int)
    _setting(parser, "alpha", f"LoRA alpha; scale = alpha / rank (default: {TRAIN_DEFAULTS['alpha']})", type=float)
    _setting(parser, "init", "LoRA init: peft (B = 0, a fresh adapter is the base model) or paper (both small "
             "random; default: peft)", choices=LORA_INITS)
    _setting(parser, "targets", "comma-separated module names to adapt (default: the architecture's projections)",
             type=_names)
    _setting(parser, "hyper_hidden", "hidden sizes of the hyper-network, e.g. 64,32 (default: 64,32)", type=_ints)
    _setting(parser, "hyper_dropout", "dropout inside the hyper-network (default: 0.5)", type=float)
    _setting(parser, "hyper_init", "the hyper-network's output layer at the start: paper (N(0, 1e-3), an update near "
             "zero) or lora (zero weights, bias a PEFT-initialised LoRA; default: paper)", choices=HYPER_INITS)
    _setting(parser, "condition_source", "what a condition's vector is the mean of: embeddings (its input-token "
             "embeddings, as published) or hidden (the frozen model's final hidden states over its tokens; default: "
             "embeddings)", choices=CONDITION_SOURCES)
    _setting(parser, "max_length", type=int)
    _setting(parser, "context_tokens", type=int)
    _setting(parser, "k", "number of clusters (default: rows // batch size)", type=int)
    _setting(parser, "max_train_rows", "default: all", type=int)
    _setting(parser, "max_eval_rows", "default: all", type=int)
    _setting(parser, "selection_rows", "carve this many rows from the training rows (seeded by --data-seed, never "
             "trained on) and validate every epoch and --patience on them, so the reported splits are scored once, at "
             "the end (default: validate on the validation split)", type=int)
    _setting(parser, "patience", "stop once validation loss has not improved for this many epochs and keep the best "
             "epoch's adapters (--epochs is then the most; default: train every epoch)", type=int)
    _setting(parser, "cached_features", "head-only regimes (lora-head, chameleon-head): run the frozen transformer "
             "once per split and train the head on its cached hidden states (the same losses where the transformer "
             "has no dropout; reproduce: its head-only rows)", action="store_true")
    _setting(parser, "data_seed", type=int)
    _setting(parser, "device", f"{DEVICE_HELP} (default: {TRAIN_DEFAULTS['device']})")


def _train_config(args: argparse.Namespace, preset: dict | None = None) -> TrainConfig:
    """:data:`TRAIN_DEFAULTS`, overridden by ``preset``, overridden by the options given."""
    given = {name: value for name, value in vars(args).items() if name in TRAIN_DEFAULTS and value is not None}
    return TrainConfig(**{**TRAIN_DEFAULTS, **(preset or {}), **given})


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _lrs(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated learning rates are needed, e.g. 3e-4,1e-3,3e-3; got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=TRAIN_DEFAULTS["device"], help=f"{DEVICE_HELP} (default: %(default)s)")


# ---------------------------------------------------------------- handlers
def _train(args: argparse.Namespace) -> dict:
    result = train(_train_config(args), args.out, resume=args.resume, overwrite=args.overwrite)
    return {k: result[k] for k in ("trainable_parameters", "train_loss", "eval", "eval_split", "k", "padding_share")}


def _evaluate(args: argparse.Namespace) -> dict:
    return evaluate_bundle(fetch_bundle(args.bundle), dataset=args.dataset, data_dir=args.data_dir, protocol=args.protocol,
                           split=args.split, max_eval_rows=args.max_eval_rows, device=args.device)


def _reproduce(args: argparse.Namespace) -> None:
    config = _train_config(args, preset_settings(args.preset, args.dataset) if args.preset else None)
    only = set(args.only) if args.only else None
    results = reproduce(config, args.out, tuple(args.protocols), args.seeds, args.ablation_seeds, args.k_sweep,
                        collect_only=args.collect_only, only=only, lr_grid=args.lr_grid, grid=args.grid,
                        lr_seed=args.lr_seed)
    print(results_markdown(results))


def _report(args: argparse.Namespace) -> None:
    write_readme(args.readme, args.root, args.bundles)


def _generate(args: argparse.Namespace) -> dict:
    """A single bundle answers alone; a bundle set (lora/ + chameleon/) compares all three models."""
    try:
        text = Path(args.prompts_file).read_text(encoding="utf-8") if args.prompts_file else "\n".join(args.prompt or [])
    except UnicodeDecodeError as err:
        raise ValueError(f"--prompts-file {args.prompts_file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    request = Request.parse(validate_prompts(text), args.cluster_source, args.k, args.max_new_tokens, args.seed,
                            "sample" if args.sample else "greedy")
    path = fetch_bundle(args.bundle)
    if (path / "config.json").is_file():  # a single bundle
        model = load_model(args.model)[0] if args.model else None
        bundle = load_bundle(path, model)
        template = bundle.metadata.get("prompt_template", "{prompt}")
        fitted = fit_prompts(bundle.model, bundle.tokenizer, list(request.prompts), request.max_new_tokens, template)
        embeddings = embed_prompts(bundle, fitted.conditions)
        assignment = assign(bundle, embeddings, request.cluster_source, request.k, request.seed)
        texts = generate(bundle.model, bundle.tokenizer, fitted.texts, embeddings, assignment.labels,
                         assignment.centroids, request.max_new_tokens, request.do_sample, request.seed,
                         bundle.adapter.conditioning, answer_stops(template))
        result = {"bundle": str(path), "regime": bundle.adapter.regime, "cluster_source": request.cluster_source, "prompts": [
            {"prompt": p, "cluster": int(assignment.labels[i]), "distance": float(assignment.distances[i]), "generation": texts[i]}
            for i, p in enumerate(request.prompts)]}
    else:
        if not (path / "lora").is_dir() and not (path / "chameleon").is_dir():
            state = "it holds no config.json" if path.is_dir() else "the folder does not exist"
            raise BundleError(f"--bundle {path} is neither a bundle nor a bundle set ({state}; a bundle holds "
                              "config.json, a bundle set a lora/ and a chameleon/ bundle)")
        model_name = args.model or read_bundle_config(path / "chameleon")["base_model"]
        bundle_set = open_bundle_set(model_name, path, build=False)
        comparison = bundle_set.compare(request)
        fitted = comparison.fitted
        result = {"bundle_set": bundle_set.describe(), "cluster_source": request.cluster_source, "prompts": comparison.rows(),
                  "adapters": [asdict(view) for view in comparison.adapters]}
    return {**result, "note": fitted.note()} if fitted.cut else result


def _share_bundle(args: argparse.Namespace) -> dict:
    out = share_bundle(args.bundle, args.out)
    return {"bundle": str(out), "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}


def _export_peft(args: argparse.Namespace) -> dict:
    result = export_bundle_peft(args.bundle, args.out)
    if result["warning"]:
        print(f"warning: {result['warning']}", file=sys.stderr)
    return result


def _model_card(args: argparse.Namespace) -> dict:
    return {"cards": [str(write_model_card(path, args.repo_id)) for path in args.bundles]}


def _bench(args: argparse.Namespace) -> None:
    settings = BenchSettings.quick_settings() if args.quick else BenchSettings()
    given = {name: getattr(args, name) for name in ("device", "batch", "seq", "new_tokens", "repeats", "serving_set")}
    given["models"] = tuple(args.models) if args.models is not None else None
    given["sections"] = tuple(args.sections) if args.sections is not None else None
    settings = replace(settings, kmeans_reference=args.kmeans_reference,
                       **{name: value for name, value in given.items() if value is not None})
    previous = None
    if args.json is not None and args.json.is_file() and set(settings.sections) != set(SECTIONS):
        try:  # read before the long run: a file that cannot be kept from is refused now, not overwritten later
            previous = json.loads(args.json.read_text())
        except json.JSONDecodeError as err:
            previous = err
        if not isinstance(previous, dict) or not set(previous) & set(SECTIONS):
            raise ValueError(f"--json {args.json} holds no bench sections ({', '.join(SECTIONS)}) to keep beside "
                             "the ones measured now: move it away or name another file")
    result = run_bench(settings)
    print(format_report(result))
    if args.json is not None:
        if previous is not None:
            result = merge_runs(previous, result)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chameleon_core", description="ChameleonLLM commands")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("params", help="print the trainable parameters of each regime as JSON")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--tokenizer", default=None, help="tokenizer id or folder (default: the model's)")
    p.add_argument("--rank", type=int, default=TRAIN_DEFAULTS["rank"], help="LoRA rank (default: %(default)s)")
    p.add_argument("--k", "--clusters", dest="k", type=int, default=1,
                   help="the training cluster count for lora-per-cluster, which holds one head LoRA per cluster "
                   "(default 1; --clusters is the older name)")
    p.set_defaults(run=params)

    p = commands.add_parser("train", help="train one regime; the output folder is a loadable bundle")
    _add_training_settings(p)
    _setting(p, "regime", choices=REGIMES)
    _setting(p, "protocol", choices=PROTOCOLS)
    _setting(p, "sampler", choices=SAMPLERS)
    _setting(p, "conditioning", "the hyper-network's input: the batch's mean (the paper), each row's cluster "
             "centroid, or each row itself (default: batch)", choices=CONDITIONING)
    _setting(p, "seed", type=int)
    p.add_argument("--out", required=True, help="run folder (bundle + metrics + checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run the folder already holds (default: refuse)")
    p.set_defaults(run=_train)

    p = commands.add_parser("evaluate", help="evaluate one bundle on a dataset split, prepared as its training run did")
    p.add_argument("--bundle", required=True, help="a bundle folder or a Hugging Face Hub repo id (user/repo)")
    p.add_argument("--dataset", default=None, choices=DATASETS, help="default: the dataset the bundle was trained on")
    p.add_argument("--data-dir", dest="data_dir", default=None, help="default: the bundle's")
    p.add_argument("--protocol", default=None, choices=PROTOCOLS, help="default: the bundle's training protocol")
    p.add_argument("--split", default=None, help="default: test if the dataset has one, else validation")
    p.add_argument("--max-eval-rows", dest="max_eval_rows", type=int, default=None, help="default: all")
    _add_device(p)
    p.set_defaults(run=_evaluate)

    p = commands.add_parser("reproduce", help="every regime and ablation under both protocols; writes the results table")
    _add_training_settings(p)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", "--profile", dest="preset", choices=tuple(PRESETS), default=None,
                   help="the settings to start from (options given win): tiny: random tiny GPT-2 + synthetic corpus "
                        "(minutes on a CPU); paper: gpt2 + hub data + published hyper-parameters (--profile is the older name)")
    p.add_argument("--protocols", type=_names, default="paper,causal")
    p.add_argument("--seeds", type=_ints, default="0", help="seeds of the headline rows, e.g. 0,1,2")
    p.add_argument("--ablation-seeds", dest="ablation_seeds", type=_ints, default="0")
    p.add_argument("--k-sweep", dest="k_sweep", type=_ints, default="",
                   help="extra chameleon rows with these cluster counts, e.g. 8,32")
    p.add_argument("--collect-only", dest="collect_only", action="store_true",
                   help="train nothing: tabulate the runs already finished in --out (rows show how many seeds finished)")
    p.add_argument("--only", type=_names, default=None,
                   help="train only these rows, e.g. causal/chameleon-random-batches (comma-separated); gather the rest")
    p.add_argument("--lr-grid", dest="lr_grid", type=_lrs, default=None,
                   help="learning rates to try, e.g. 3e-4,1e-3,3e-3 (at least 2): each trains in seed<N>/lr<value>/ and "
                   "the seed reports the one with the lowest loss on the selection rows (needs --selection-rows; "
                   "the base row trains nothing and runs once; pass the same grid with --collect-only)")
    p.add_argument("--lr-seed", dest="lr_seed", type=int, default=None,
                   help="with --lr-grid: only this seed runs the grid; each row's other seeds train once, at the rate "
                   "it chose (pass it again with --collect-only)")
    p.add_argument("--grid", choices=GRIDS, default="full",
                   help="full: every regime and ablation; head-only: the published configuration (the hyper-LoRA head "
                   "alone) and its head-only controls, at published and best-chance settings (with --k-sweep, the "
                   "cluster-dependent arms again at each k); pass --cached-features to train them on cached states; "
                   "best-chance: chameleon and chameleon-constant (layer LoRA included) at the best-chance settings")
    p.set_defaults(run=_reproduce)

    p = commands.add_parser("report", help="write the committed results and bench figures into README.md")
    p.add_argument("root", nargs="?", type=Path, default=Path("assets/results"),
                   help="folder with **/results.json and bench.json")
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    p.add_argument("--bundles", type=Path, default=Path("assets/bundles"), help="folder of the committed demo sets")
    p.set_defaults(run=_report)

    p = commands.add_parser("share-bundle", help="copy a bundle fit to publish: half precision, no training text, "
                            "no tokenizer")
    p.add_argument("--bundle", required=True, type=Path, help="the bundle (a train run folder, or lora/ or chameleon/)")
    p.add_argument("--out", required=True, type=Path, help="a new folder (refused if it exists)")
    p.set_defaults(run=_share_bundle)

    p = commands.add_parser("export-peft", help="write a bundle as PEFT adapters: static LoRA as one, ChameleonLLM as "
                            "one per training cluster (its head update conditioned on the cluster's centroid)")
    p.add_argument("--bundle", required=True, type=Path, help="the bundle (a train run folder, or lora/ or chameleon/)")
    p.add_argument("--out", required=True, type=Path, help="a new folder (refused if it exists)")
    p.set_defaults(run=_export_peft)

    p = commands.add_parser("model-card", help="(re)write the README.md model card of bundles, from their config.json")
    p.add_argument("bundles", nargs="+", type=Path, help="bundle folders, e.g. assets/bundles/*/lora assets/bundles/*/chameleon")
    p.add_argument("--repo-id", dest="repo_id", default=None, help="the Hub repo (user/repo) the card's commands load from")
    p.set_defaults(run=_model_card)

    p = commands.add_parser("generate", help="answer prompts with base, static LoRA and ChameleonLLM; print JSON")
    p.add_argument("--bundle", required=True, help="a bundle, or a bundle set folder holding lora/ and chameleon/, "
                   "or a Hugging Face Hub repo id (user/repo) holding one")
    p.add_argument("--model", default=None, help="base model (default: the one the bundles name)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", help="a text file, one prompt per line")
    p.add_argument("--cluster-source", "--clusters", dest="cluster_source", default="trained", choices=CLUSTER_SOURCES,
                   help="assign each prompt to its nearest trained cluster, or run k-means on the prompts (default: "
                   "trained; --clusters is the older name)")
    p.add_argument("--k", type=int, default=3,
                   help=f"cluster count among the prompts with --cluster-source prompts (1-{MAX_PROMPTS})")
    p.add_argument("--max-new-tokens", type=int, default=32, help=f"1-{MAX_NEW_TOKENS}")
    p.add_argument("--sample", action="store_true", help="sample (seeded) instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="0 to 2**32 - 1")
    p.set_defaults(run=_generate)

    d = BenchSettings()
    p = commands.add_parser("bench", help="measure what ChameleonLLM costs next to the base model, static LoRA "
                            "and PEFT's mixed-adapter batches")
    p.add_argument("--models", "--model", dest="models", type=_names, default=None,
                   help=f"comma-separated hub ids, local folders or random:*, each measured on its own (default: "
                        f"{','.join(d.models)}, GPT-2 small's shape with random weights: the scale of the paper's "
                        "counts, and timings do not depend on the weights; random:gpt2,random:smollm2 adds "
                        "SmolLM2-135M's shape)")
    p.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    p.add_argument("--quick", action="store_true", help="random:tiny-gpt2 and random:tiny-llama, a tiny batch and "
                   "1 repeat, after checking every path's outputs")
    _add_device(p)
    p.add_argument("--batch", type=int, default=None,
                   help=f"rows per batch, >= 16: the sweep mixes 1, 4, 16 and --batch clusters (default: {d.batch})")
    p.add_argument("--seq", type=int, default=None, help=f"tokens per row (default: {d.seq}; prompts are seq // 4)")
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=None,
                   help=f"generated per row (default: {d.new_tokens})")
    p.add_argument("--repeats", type=int, default=None, help=f"interleaved rounds (default: {d.repeats})")
    p.add_argument("--kmeans-reference", dest="kmeans_reference", action="store_true",
                   help="also fit the slow reference k-means (minutes) and compare inertia")
    p.add_argument("--sections", type=_names, default=None,
                   help=f"comma-separated, of {', '.join(SECTIONS)}: shapes measures every --models shape, serving "
                        "serves --serving-set to 1, 8 and 24 concurrent clients in process and through the page's "
                        "API (run from the repository root); sections not measured are kept from an existing --json "
                        f"file (default: {','.join(d.sections)})")
    p.add_argument("--serving-set", dest="serving_set", default=None,
                   help=f"the bundle set the serving section serves (default: {d.serving_set})")
    p.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except (ValueError, OSError) as err:  # bad input (BundleError, ModelError included) or unreadable files
        # One line, no traceback: library errors (hub, tokenizers) span several lines, so they are joined.
        print(f"error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0
