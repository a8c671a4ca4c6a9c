"""Loading base models and tokenizers: hub ids, local folders, and random models for offline use.

``random:tiny-gpt2`` and ``random:tiny-llama`` are seeded random models with a byte-level BPE
tokenizer trained in about a second on the synthetic corpus; ``random:gpt2`` has GPT-2 small's
exact shape (124,439,808 parameters), valid for shapes, parameter counts and speed, not quality.
"""

from __future__ import annotations

import functools
import hashlib
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

RANDOM_MODELS = ("random:tiny-gpt2", "random:tiny-llama", "random:gpt2")
EOS = "<|endoftext|>"


def resolve_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
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
    elif name == "random:tiny-gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=64, n_layer=2, n_head=2, bos_token_id=eos, eos_token_id=eos)
    else:
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
        )
    model_cls = GPT2LMHeadModel if name.endswith("gpt2") else LlamaForCausalLM
    return model_cls(config)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name.startswith("random:"):
        return tiny_tokenizer()
    return prepare_tokenizer(AutoTokenizer.from_pretrained(name))


def load_model(
    name: str, device: str = "cpu", tokenizer: str | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode and its prepared tokenizer, from a hub id, a folder or ``random:*``."""
    if name.startswith("random:"):
        if name not in RANDOM_MODELS:
            raise ValueError(f"unknown random model {name!r}; choose from {RANDOM_MODELS}")
        tok = load_tokenizer(tokenizer or name)
        model = _random_model(name, tok, seed)
    else:
        if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
            raise FileNotFoundError(f"model folder {name!r} does not exist")
        tok = load_tokenizer(tokenizer or name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
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
