"""Static LoRA: one module for ``nn.Linear`` and GPT-2's ``Conv1D``.

Follows PEFT's conventions so adapters are interchangeable with it:
``y = W x + (alpha / r) * B (A x)`` with ``A`` of shape ``(r, in)`` and ``B`` of shape
``(out, r)``; ``B`` starts at zero so a fresh adapter is the identity. ``Conv1D`` stores its
weight as ``(in, out)`` (fan-in first); the adapter itself is the same, only merging
transposes the update.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# Projections that carry LoRA in each architecture (the PEFT defaults plus the MLP).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
LORA_INITS = ("peft", "paper")


def features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    raise TypeError(f"LoRA wraps nn.Linear or transformers Conv1D, not {type(layer).__name__}")


class LoRALayer(nn.Module):
    """A frozen projection plus a trainable rank-``r`` update.

    ``init="peft"``: A Kaiming-uniform, B zero (identity at start, as PEFT).
    ``init="paper"``: A and B both ``0.01 * N(0, 1)``, as the published code (not identity).
    ``tied``: another module holds the same weight (a head tied to the input embedding), so
    :meth:`merge` must never write it; the ``inject_*`` functions set it.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, init: str = "peft", tied: bool = False):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        if init not in LORA_INITS:
            raise ValueError(f"unknown LoRA init {init!r}; choose from {LORA_INITS}")
        self.base = base
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.in_features, self.out_features = features(base)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=weight.device, dtype=weight.dtype))
        if init == "peft":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=0.01)
            nn.init.normal_(self.lora_B, std=0.01)
        self.tied, self.merged = tied, False
        self.disabled = False  # set by lora_disabled: the base layer's output alone
        # What unmerge restores: the original values (a buffer, so it follows .to() but stays out of
        # checkpoints), or for a tied weight the shared parameter itself, which its other holder keeps.
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self._tied_weight: nn.Parameter | None = None

    def delta_weight(self) -> torch.Tensor:
        """The update in the base layer's own weight layout."""
        delta = self.scale * (self.lora_B @ self.lora_A)  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.disabled:
            return y
        return y + self.scale * ((x @ self.lora_A.T) @ self.lora_B.T)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the weight for zero-overhead inference; :meth:`unmerge` is exact.

        ``state_dict()`` keys and ``named_parameters()`` names do not change, so a merged model saves
        under the same names and carries no extra copy of the old weights. The weight's data is
        swapped, so the parameter object (and an optimizer's reference to it) survives. A tied weight
        is never written: while merged the base's ``weight`` is a buffer holding the merged copy (a
        second parameter would add a name), so the input embedding is unchanged.
        """
        if self.merged:
            return
        weight = self.base.weight
        merged = weight + self.delta_weight()
        if self.tied:
            object.__setattr__(self, "_tied_weight", weight)  # nn.Module would register a parameter
            del self.base.weight
            self.base.register_buffer("weight", merged)
        else:
            self._unmerged_weight = weight.data
            weight.data = merged
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.tied:
            del self.base.weight
            self.base.weight = self._tied_weight
            self._tied_weight = None
        else:
            self.base.weight.data = self._unmerged_weight
            self._unmerged_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, fan_in_fan_out={self.fan_in_fan_out}"


def default_targets(model: nn.Module) -> tuple[str, ...]:
    model_type = getattr(model.config, "model_type", "")
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    head = output_head_name(model)
    guess = tuple(sorted(n for n in names if n != head))
    raise ValueError(
        f"no default LoRA targets for model_type {model_type!r}; pass targets explicitly, e.g. one of {guess}"
    )


def output_head_name(model: nn.Module) -> str:
    """Attribute path of the output embedding (``lm_head`` for most causal LMs)."""
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            return name
    raise ValueError("model has no output embedding")


def is_tied(model: nn.Module, layer: nn.Module) -> bool:
    """Whether another module of ``model`` holds ``layer.weight`` (a head tied to the input embedding)."""
    return any(p is layer.weight for m in model.modules() if m is not layer for p in m.parameters(recurse=False))


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def target_modules(model: nn.Module, targets: tuple[str, ...] | list[str]) -> dict[str, nn.Module]:
    """Every Linear/Conv1D whose last name component is in ``targets``, never the output head."""
    head = model.get_output_embeddings()
    wanted = set(targets)
    found = {
        name: module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in wanted and isinstance(module, (nn.Linear, Conv1D)) and module is not head
    }
    if not found:
        raise ValueError(f"no nn.Linear or Conv1D module matches LoRA targets {sorted(wanted)}")
    return found


def inject_lora(
    model: nn.Module, targets: tuple[str, ...] | list[str], r: int, alpha: float, init: str = "peft"
) -> list[str]:
    """Wrap the :func:`target_modules` in :class:`LoRALayer`; returns their names.

    The output head is wrapped only by :func:`inject_head_lora`, never through a shared suffix.
    """
    found = target_modules(model, targets)
    for name, module in found.items():
        set_module(model, name, LoRALayer(module, r, alpha, init, tied=is_tied(model, module)))
    return list(found)


def inject_head_lora(model: nn.Module, r: int, alpha: float, init: str = "peft") -> str:
    """Wrap the output head; a tied input embedding stays untouched (see ``LoRALayer.merge``)."""
    name = output_head_name(model)
    head = model.get_submodule(name)
    set_module(model, name, LoRALayer(head, r, alpha, init, tied=is_tied(model, head)))
    return name


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """The model as its base weights compute, its layers' LoRA switched off (merged ones unmerged) for the
    block, then restored as it was."""
    layers = list(lora_layers(model).values())
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False
        for layer in merged:
            layer.merge()
