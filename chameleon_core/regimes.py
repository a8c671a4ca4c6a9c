"""The adaptation regimes compared in this project, behind one function: :func:`apply_regime`.

- ``base``: the unadapted model.
- ``lora-head``: static LoRA on the output head only (what the published "Traditional LoRA" trained).
- ``lora``: static LoRA on the transformer projections and the head (what the paper describes).
- ``chameleon``: static LoRA on the projections, hyper-LoRA on the head (ChameleonLLM as the paper describes it).
- ``chameleon-head``: the hyper-LoRA head alone, no layer LoRA: ChameleonLLM as the published code trains it
  (its LoRA wraps ``nn.Linear`` only, and GPT-2's projections are ``Conv1D``), beside ``lora-head``.
- ``lora-matched``: ``lora`` at the rank that gives about as many trainable parameters as ``chameleon``.
- ``chameleon-constant``: ``chameleon`` with one learned vector, not the conditioning, as the hyper-network's
  input: the same architecture and one more vector of parameters, without the conditioning.
- ``lora-per-cluster``: layer LoRA plus one static head LoRA per training cluster, each row using its cluster's.
- ``lora-head-matched``, ``chameleon-head-constant``, ``lora-head-per-cluster``: the last three with no layer
  LoRA, the twins of ``chameleon-head`` (matched to its parameter count, its constant input, one head LoRA per
  cluster), so the published configuration has its controls too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from torch import nn

from .hyper_head import CONDITIONING, HYPER_INITS, ClusterLoRAHead, ConditionedHead, HyperLoRAHead, HyperNetwork
from .lora import (
    LORA_INITS, LoRALayer, default_targets, features, inject_head_lora, inject_lora, output_head_name, set_module, target_modules,
)

# The largest LoRA scale alpha / r accepted. Alpha 0 makes an adapter that can never act; past this
# scale the update swamps the base weights (published LoRA scales are 0.25 to 16), and near float32's
# range it overflows.
MAX_SCALE = 1000.0
REGIMES = ("base", "lora-head", "lora", "chameleon", "chameleon-head", "lora-matched", "chameleon-constant", "lora-per-cluster",
           "lora-head-matched", "chameleon-head-constant", "lora-head-per-cluster")
# What each regime is, in one place (the trainer, bundles, the demo and the CLI read these):
HEAD_ONLY = ("lora-head", "chameleon-head", "lora-head-matched", "chameleon-head-constant", "lora-head-per-cluster")  # no layer LoRA
STATIC = ("lora-head", "lora", "lora-matched", "lora-head-matched")  # static LoRA alone: one adapter for every input (exports to PEFT)
HYPER_HEADS = ("chameleon", "chameleon-head", "chameleon-constant", "chameleon-head-constant")  # a hyper-network generates the head's update
CONDITIONED = ("chameleon", "chameleon-head")  # ... reading the condition (the -constant twins read a learned vector)
CONSTANT = ("chameleon-constant", "chameleon-head-constant")  # a hyper-network fed one learned vector
MATCHED = ("lora-matched", "lora-head-matched")  # static LoRA at the rank matching the hyper-network regime's size
ROUTED = ("lora-per-cluster", "lora-head-per-cluster")  # each row's head adapter is its nearest training centroid's


@dataclass(frozen=True)
class AdapterConfig:
    """Everything needed to rebuild a regime's adapters on a base model.

    ``alpha`` defaults to the rank: scale ``alpha / r = 1``, the effective scale of the
    published code (which used ``alpha = 1`` without dividing by ``r``).
    """

    regime: str = "chameleon"
    rank: int = 4
    alpha: float = 4.0
    init: str = "peft"
    targets: tuple[str, ...] = ()  # empty: the architecture's defaults
    hyper_hidden: tuple[int, ...] = (64, 32)
    hyper_dropout: float = 0.5
    conditioning: str = "batch"
    matched_rank: int = 0  # the matched regimes only: the static rank chosen (0 until chosen)
    k: int = 0  # the training cluster count (set once k-means has run); lora-per-cluster holds a head LoRA each
    hyper_init: str = "paper"  # the hyper-network's output layer at the start: hyper_head.HYPER_INITS

    def __post_init__(self):
        if self.regime not in REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; choose from {REGIMES}")
        if self.conditioning not in CONDITIONING:
            raise ValueError(f"unknown conditioning {self.conditioning!r}; choose from {CONDITIONING}")
        if self.init not in LORA_INITS:
            raise ValueError(f"unknown LoRA init {self.init!r}; choose from {LORA_INITS}")
        if self.hyper_init not in HYPER_INITS:
            raise ValueError(f"unknown hyper-network init {self.hyper_init!r}; choose from {HYPER_INITS}")
        if any(size < 1 for size in self.hyper_hidden) or not 0 <= self.hyper_dropout < 1:
            raise ValueError(f"hyper_hidden sizes must be >= 1 and 0 <= hyper_dropout < 1, got "
                             f"{self.hyper_hidden} and {self.hyper_dropout}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and 0 < self.alpha <= MAX_SCALE * self.rank):
            raise ValueError(f"alpha must be a finite number > 0 with scale alpha / rank at most {MAX_SCALE:g} "
                             f"(at rank {self.rank}: 0 < alpha <= {MAX_SCALE * self.rank:g}), got {self.alpha}")
        if self.matched_rank < 0 or self.k < 0:
            raise ValueError(f"matched_rank and k must be >= 0, got {self.matched_rank} and {self.k}")

    @property
    def lora_rank(self) -> int:
        """Rank of the static LoRA modules (differs from ``rank`` only for ``lora-matched``)."""
        return self.matched_rank if self.regime in MATCHED else self.rank

    @property
    def lora_alpha(self) -> float:
        """Alpha at :attr:`lora_rank` that keeps the scale ``alpha / rank``."""
        return self.alpha * self.lora_rank / self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        """Rebuild from JSON, checking every key and type (a hand-edited bundle config names its mistake)."""
        if not isinstance(data, dict):
            raise ValueError(f"the adapter config must be a JSON object, got {type(data).__name__}")
        allowed = {f.name: f.type for f in fields(cls)}
        if "clusters" in data and "k" not in data:  # what bundles saved before the count was named k call it
            data = {("k" if key == "clusters" else key): value for key, value in data.items()}
        if unknown := sorted(set(data) - set(allowed)):
            raise ValueError(f"unknown adapter config key {unknown[0]!r}; allowed keys: {', '.join(allowed)}")
        values = {}
        for key, raw in data.items():
            expected, item = _JSON_TYPES[allowed[key]]
            value = tuple(raw) if isinstance(raw, list) and item is not None else raw
            if not _is_json_type(value, expected) or (item and not all(_is_json_type(v, item) for v in value)):
                raise ValueError(f"adapter config field {key!r} must be {_TYPE_NAMES[allowed[key]]}, got {raw!r}")
            values[key] = float(value) if expected is float else value
        return cls(**values)


# The JSON form of each AdapterConfig field type (annotations are strings here): (type, item type).
_JSON_TYPES = {"str": (str, None), "int": (int, None), "float": (float, None),
               "tuple[str, ...]": (tuple, str), "tuple[int, ...]": (tuple, int)}
_TYPE_NAMES = {"str": "a string", "int": "an integer", "float": "a number",
               "tuple[str, ...]": "a list of strings", "tuple[int, ...]": "a list of integers"}


def _is_json_type(value, expected: type) -> bool:
    """``isinstance`` as JSON means it: booleans are not numbers, integers are numbers."""
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if expected is float else isinstance(value, expected)


@dataclass
class RegimeReport:
    """What :func:`apply_regime` did: the resolved config and where the trainable parameters are."""

    config: AdapterConfig
    layer_modules: list[str] = field(default_factory=list)
    head_module: str | None = None


def choose_matched_rank(model: nn.Module, config: AdapterConfig) -> int:
    """The static-LoRA rank (layers + head; the head alone for a head-only regime) whose parameter count is
    closest to ``chameleon``'s (``chameleon-head``'s)."""
    head_only = config.regime in HEAD_ONLY
    targets = () if head_only else config.targets or default_targets(model)
    per_rank_layers = sum(sum(features(m)) for m in target_modules(model, targets).values()) if targets else 0
    head_in, head_out = features(model.get_output_embeddings())
    embedding_dim = model.get_input_embeddings().embedding_dim
    hyper = HyperNetwork(embedding_dim, head_in, head_out, config.rank, config.hyper_hidden, config.hyper_dropout).to("meta")
    chameleon = config.rank * per_rank_layers + sum(p.numel() for p in hyper.parameters())
    return max(1, round(chameleon / (per_rank_layers + head_in + head_out)))


def apply_regime(model: nn.Module, config: AdapterConfig) -> RegimeReport:
    """Freeze ``model`` and add the regime's adapters in place.

    For the matched regimes the returned config carries the matched rank, so a bundle can rebuild it;
    the per-cluster regimes hold ``config.k`` head adapters (one while the clusters are unknown).
    """
    if any(isinstance(m, (LoRALayer, ConditionedHead)) for m in model.modules()):
        raise ValueError("the model already carries adapters; apply a regime to a fresh base model")
    for p in model.parameters():
        p.requires_grad_(False)
    if config.regime == "base":
        return RegimeReport(config)
    if config.regime not in HEAD_ONLY:  # the head alone needs no layer targets
        config = replace(config, targets=tuple(config.targets or default_targets(model)))
    if config.regime in MATCHED and not config.matched_rank:
        config = replace(config, matched_rank=choose_matched_rank(model, config))
    if config.regime in ROUTED and not config.k:
        config = replace(config, k=1)
    report = RegimeReport(config)
    r, alpha = config.lora_rank, config.lora_alpha
    if config.regime not in HEAD_ONLY:
        report.layer_modules = inject_lora(model, config.targets, r, alpha, config.init)
    name = output_head_name(model)
    if config.regime in HYPER_HEADS:
        head = HyperLoRAHead(
            model.get_submodule(name), model.get_input_embeddings().embedding_dim, config.rank, config.alpha,
            config.hyper_hidden, config.hyper_dropout, constant=config.regime in CONSTANT,
            init=config.hyper_init,
        )
        set_module(model, name, head)
    elif config.regime in ROUTED:
        set_module(model, name, ClusterLoRAHead(model.get_submodule(name), config.k, r, alpha, config.init))
    else:
        inject_head_lora(model, r, alpha, config.init)
    report.head_module = name
    model.train(model.training)  # new modules join the model's train/eval mode (hyper dropout!)
    return report


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors only: what a bundle stores."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
