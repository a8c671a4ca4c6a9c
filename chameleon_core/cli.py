"""The ``python -m chameleon_core`` commands.

Each command lives beside the code it drives and registers itself through a ``register``
function taking the sub-parser collection; this module only collects them.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

from .models import load_model
from .regimes import REGIMES, AdapterConfig, apply_regime, trainable_parameters


def params(args: argparse.Namespace) -> dict:
    """Trainable parameters of every regime on one base model, counted on real modules."""
    base, _ = load_model(args.model, tokenizer=args.tokenizer)
    result = {"model": args.model, "rank": args.rank, "base_parameters": sum(p.numel() for p in base.parameters())}
    regimes = {}
    for regime in REGIMES:
        model = copy.deepcopy(base)
        report = apply_regime(model, AdapterConfig(regime=regime, rank=args.rank))
        entry = {"trainable": trainable_parameters(model)}
        if regime != "base":
            entry["head"] = trainable_parameters(model.get_submodule(report.head_module))
            entry["layers"] = entry["trainable"] - entry["head"]
            entry["lora_rank"] = report.config.lora_rank
        regimes[regime] = entry
    result["regimes"] = regimes
    return result


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("params", help="print the trainable parameters of each regime as JSON")
    p.add_argument("--model", default="gpt2", help="hub id, local folder, or random:{tiny-gpt2,tiny-llama,gpt2}")
    p.add_argument("--tokenizer", default=None, help="tokenizer id or folder (default: the model's)")
    p.add_argument("--rank", type=int, default=4)
    p.set_defaults(run=params)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chameleon_core", description="ChameleonLLM commands")
    commands = parser.add_subparsers(dest="command", required=True)
    from . import bench, inference, report, reproduce, train

    register(commands)
    for module_register in (train.register, reproduce.register, report.register, inference.register, bench.register):
        module_register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: say what is wrong, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0
