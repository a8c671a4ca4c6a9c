"""ChameleonLLM: batch-aware dynamic low-rank adaptation via inference-time clusters.

One concept per module:

- :mod:`.data` — WikiText-2, Alpaca and a synthetic corpus as :class:`Record` lists.
- :mod:`.models` — base models and tokenizers (hub, local folder, ``random:*``).
- :mod:`.embeddings` — the normalised mean token embedding that clusters and conditions.
- :mod:`.clustering` — k-means and cluster-homogeneous batch samplers.
- :mod:`.lora` — static LoRA for ``nn.Linear`` and GPT-2's ``Conv1D``.
- :mod:`.hyper_head` — the hyper-LoRA output head and its conditioning.
- :mod:`.regimes` — base / lora-head / lora / chameleon / chameleon-head / lora-matched behind one call.
- :mod:`.bundle` — save, load and export trained adapters.
"""

from .bundle import Bundle, BundleError, Points, export_peft, load_bundle, save_bundle
from .clustering import ClusterBatchSampler, Clusters, RandomBatchSampler, default_k, fit_clusters
from .data import Record, load_alpaca, load_dataset_splits, load_synthetic, load_wikitext
from .embeddings import embed_texts, mean_embedding
from .hyper_head import HyperLoRAHead, HyperNetwork, condition_groups, conditioned, hyper_head
from .lora import LoRALayer, inject_head_lora, inject_lora, lora_layers, merge_lora, unmerge_lora
from .models import load_model, load_tokenizer, model_fingerprint
from .regimes import REGIMES, AdapterConfig, apply_regime, trainable_parameters

__all__ = [
    "REGIMES", "AdapterConfig", "Bundle", "BundleError", "Points", "ClusterBatchSampler", "Clusters", "HyperLoRAHead",
    "HyperNetwork", "LoRALayer", "RandomBatchSampler", "Record", "apply_regime", "condition_groups", "conditioned",
    "default_k", "embed_texts", "export_peft", "fit_clusters", "hyper_head", "inject_head_lora", "inject_lora",
    "load_alpaca", "load_bundle", "load_dataset_splits", "load_model", "load_synthetic", "load_tokenizer",
    "load_wikitext", "lora_layers", "mean_embedding", "merge_lora", "model_fingerprint", "save_bundle",
    "trainable_parameters", "unmerge_lora",
]
