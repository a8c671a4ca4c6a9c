"""ChameleonLLM demo: the base model, static LoRA and ChameleonLLM answer the same prompts side by side.

``python app.py`` serves it on http://127.0.0.1:7860 (a Hugging Face Space runs the same file).
The model comes from ``--model`` or ``CHAMELEON_MODEL`` (default ``gpt2``); the adapters from
``--bundle DIR`` or the first bundle set under ``assets/bundles/`` trained on that model. When none
fits, a small demo set is trained first and kept there; the page shows its progress. All the work
is done by :mod:`chameleon_core.inference`; this file only lays it out.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from chameleon_core.data import DATASETS
from chameleon_core.inference import (
    COMPARED,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_PROMPTS,
    BundleSet,
    Comparison,
    markup_prompts,
    open_bundle_set,
    validate_prompts,
)

BUNDLES = Path(__file__).resolve().parent / "assets" / "bundles"
COLOURS = qualitative.Alphabet
ASSIGNMENT_COLUMNS = ["#", "Prompt", "Cluster", "Distance"]
GENERATION_COLUMNS = ["#", "Prompt", *COMPARED.values()]
ADAPTER_COLUMNS = ["Cluster", "Prompts", "‖scale·B·A‖_F", "Most boosted tokens (mean logit change)"]
EXAMPLES = {
    "Six domains": "Whisk the butter, then fold the dough and bake it until golden.\n"
    "The telescope tracked a faint comet across the spiral galaxy.\n"
    "The striker scored a late penalty to keep the league unbeaten.\n"
    "Refinance the loan before the quarterly dividend is taxed.\n"
    "Refactor the recursive function and cache the parsed query.\n"
    "The surgeon prescribed a lower dose for the chronic fever.",
    "Kitchen and clinic": "Simmer the broth with garlic and fresh basil.\n"
    "Season the tender roast and let the sauce reduce.\n"
    "The patient needs a vaccine before the therapy starts.\n"
    "Monitor the cardiac symptoms after the operation.",
    "Instructions": "Explain how to debug an async server.\n"
    "Describe a massive pulsar in two sentences.\n"
    "Give advice about a volatile portfolio.\n"
    "Why would someone knead the dough twice?",
}
log = logging.getLogger("chameleon.app")


class Engine:
    """Loads, or first trains, the bundle set in a background thread; the page polls its progress."""

    def __init__(self, **options):
        self.options = options  # open_bundle_set's keyword arguments
        self.fraction, self.message = 0.0, "starting"
        self.bundle_set: BundleSet | None = None
        self.error: str | None = None
        self._done = threading.Event()

    def start(self) -> Engine:
        threading.Thread(target=self._load, name="chameleon-loader", daemon=True).start()
        return self

    def _load(self) -> None:
        try:
            bundle_set = open_bundle_set(progress=self._report, **self.options)
            self._report(0.95, "fitting the cluster map")
            bundle_set.projection  # noqa: B018 (fitted now, so the first comparison is quick)
            self.bundle_set = bundle_set
        except Exception as err:  # shown on the page instead of dying in a thread nobody watches
            log.exception("could not prepare the bundle set")
            self.error = f"{type(err).__name__}: {err}"
        self._done.set()

    def _report(self, fraction: float, message: str) -> None:
        self.fraction, self.message = fraction, message

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def status(self) -> str:
        if self.error:
            return f"**Could not load the adapters.** {self.error}"
        if self.bundle_set is None:
            return f"**Preparing the adapters: {self.fraction:.0%}** ({self.message}). Compare works once this is done."
        info = self.bundle_set.describe()
        ppl = [f"{COMPARED[regime]} {m['eval']['ppl']:.1f}" for regime, m in info["metrics"].items() if "eval" in m]
        return (
            f"**Ready.** Base model `{self.options['model_name']}`; bundle set `{Path(info['path']).name}` trained on "
            f"*{info['dataset']}* with {info['k']} clusters; map: {self.bundle_set.projection.method.upper()} of "
            f"{info['points']} training inputs." + (f" Held-out perplexity: {', '.join(ppl)}." if ppl else "")
        )

    def ready(self) -> BundleSet:
        if self.bundle_set is None:
            raise gr.Error(self.status().replace("**", ""), print_exception=False)
        return self.bundle_set


# ---------------------------------------------------------------- views of a comparison
def _short(text: str, limit: int = 120) -> str:
    """Hover text: shortened and escaped, so plotly shows markup literally."""
    return html.escape(text if len(text) <= limit else text[: limit - 1] + "…")


def cluster_map(bundle_set: BundleSet, result: Comparison) -> go.Figure:
    """Training inputs coloured by cluster, the new prompts as labelled stars on the same map."""
    points, coords, trained = bundle_set.points, bundle_set.projection.coords, result.assignment.mode == "centroids"
    new = bundle_set.place(result.embeddings)
    labels = points.labels.numpy()
    figure = go.Figure()
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        figure.add_trace(go.Scatter(
            x=coords[members, 0].tolist(), y=coords[members, 1].tolist(), mode="markers", name=f"cluster {cluster}",
            marker=dict(size=5, opacity=0.45, color=COLOURS[cluster % len(COLOURS)]),
            text=[_short(points.texts[i]) for i in members], hovertemplate="%{text}<extra>cluster " + str(cluster) + "</extra>",
        ))
    new_labels = result.assignment.labels.tolist()
    figure.add_trace(go.Scatter(
        x=new[:, 0].tolist(), y=new[:, 1].tolist(), mode="markers+text", name="your prompts",
        text=[f"P{i + 1}" for i in range(len(result.prompts))], textposition="top center",
        marker=dict(symbol="star", size=17, line=dict(width=1.5, color="black"),
                    color=[COLOURS[c % len(COLOURS)] if trained else "white" for c in new_labels]),
        customdata=[[_short(p), c] for p, c in zip(result.prompts, new_labels)],
        hovertemplate="%{customdata[0]}<extra>" + ("cluster" if trained else "batch cluster") + " %{customdata[1]}</extra>",
    ))
    method = bundle_set.projection.method.upper()
    figure.update_layout(
        title=f"Training inputs by cluster ({method}); your prompts as stars", height=460,
        margin=dict(l=10, r=10, t=40, b=10), showlegend=bundle_set.clusters.k <= 20, template="plotly_white",
        xaxis=dict(title=f"{method} 1", showticklabels=False), yaxis=dict(title=f"{method} 2", showticklabels=False),
    )
    return figure


def tables(result: Comparison) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Prompt -> cluster -> distance; the three continuations; the adapter of each cluster."""
    rows = result.rows()
    assignments = pd.DataFrame(
        [[i, r["prompt"], r["cluster"], round(r["distance"], 4)] for i, r in enumerate(rows, start=1)],
        columns=ASSIGNMENT_COLUMNS,
    )
    generations = pd.DataFrame(
        [[i, r["prompt"], *(r[regime] for regime in COMPARED)] for i, r in enumerate(rows, start=1)],
        columns=GENERATION_COLUMNS,
    )
    adapters = pd.DataFrame(
        [[a.cluster, a.prompts, round(a.norm, 5), ", ".join(f"{token!r} {value:+.3g}" for token, value in a.boosted)]
         for a in result.adapters],
        columns=ADAPTER_COLUMNS,
    )
    return assignments, generations, adapters


# ---------------------------------------------------------------- the page
def build_demo(engine: Engine) -> gr.Blocks:
    def compare(prompts: str, cluster_mode: str, k: float, max_new_tokens: float, decoding: str, seed: float | None,
                progress: gr.Progress = gr.Progress()):
        try:
            texts = validate_prompts(prompts)
            bundle_set = engine.ready()
            result = bundle_set.compare(
                texts, cluster_mode, int(k), int(max_new_tokens), decoding == "sample", int(seed or 0),
                progress=lambda fraction, message: progress(fraction, desc=message),
            )
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None
        status = engine.status()
        if marked := markup_prompts(texts):
            note = f"Markup in prompt(s) {', '.join(map(str, marked))} is used and shown as plain text, never rendered."
            gr.Warning(note)
            status += f"\n\n{note}"
        return cluster_map(bundle_set, result), *tables(result), status

    def poll():
        return engine.status(), gr.Timer(active=not engine.wait(0))

    with gr.Blocks(title="ChameleonLLM demo") as demo:
        gr.Markdown(
            "# ChameleonLLM: one adapter per cluster of inputs\n"
            "Your prompts are embedded (the mean of their token embeddings), assigned to the clusters found in "
            "training, and answered by the **base** model, a **static LoRA** and **ChameleonLLM**, whose "
            "hyper-network generates the output head's low-rank update from each cluster's centroid."
        )
        status = gr.Markdown(engine.status(), elem_id="status")
        with gr.Row():
            with gr.Column(scale=3):
                prompts = gr.Textbox(
                    label=f"Prompts (one per line, up to {MAX_PROMPTS}, each up to {MAX_PROMPT_CHARS:,} characters)",
                    lines=8, max_lines=20, value=EXAMPLES["Six domains"], elem_id="prompts",
                )
                gr.Examples([[text] for text in EXAMPLES.values()], inputs=prompts, example_labels=list(EXAMPLES))
            with gr.Column(scale=2):
                cluster_mode = gr.Radio(
                    [("Assign to the trained clusters", "centroids"), ("Cluster this batch (k-means)", "batch")],
                    value="centroids", label="Cluster mode",
                )
                k = gr.Slider(1, 8, value=3, step=1, label="k (batch mode)")
                max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=32, step=1, label="Max new tokens")
                decoding = gr.Radio([("Greedy", "greedy"), ("Sampling", "sample")], value="greedy", label="Decoding")
                seed = gr.Number(0, precision=0, label="Seed (sampling and batch k-means)")
                run = gr.Button("Compare", variant="primary", elem_id="compare")
        plot = gr.Plot(label="Cluster map", elem_id="cluster-map")
        with gr.Row():
            assignments = gr.Dataframe(
                headers=ASSIGNMENT_COLUMNS, column_widths=["8%", "60%", "14%", "18%"], label="Prompt → cluster → distance to its centroid",
                interactive=False, wrap=True, elem_id="assignments",
            )
            adapters = gr.Dataframe(
                headers=ADAPTER_COLUMNS, column_widths=["14%", "14%", "17%", "55%"], label="Generated head adapter per cluster",
                interactive=False, wrap=True, elem_id="adapters",
            )
        generations = gr.Dataframe(
            headers=GENERATION_COLUMNS, column_widths=["4%", "24%", "24%", "24%", "24%"], label="Generations",
            interactive=False, wrap=True, max_height=900, elem_id="generations",
        )
        run.click(
            compare, [prompts, cluster_mode, k, max_new_tokens, decoding, seed],
            [plot, assignments, generations, adapters, status], api_name="compare",
        )
        timer = gr.Timer(1.0)
        timer.tick(poll, outputs=[status, timer], api_visibility="private", show_progress="hidden")
    return demo


def serve(demo: gr.Blocks, **launch) -> gr.Blocks:
    """Queue with a concurrency limit (the models run one batch at a time; the rest wait), then launch."""
    demo.queue(default_concurrency_limit=2, max_size=64).launch(**launch)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("CHAMELEON_MODEL", "gpt2"),
                        help="hub id, local folder or random:tiny-gpt2 (env CHAMELEON_MODEL; default gpt2)")
    parser.add_argument("--bundle", help="a bundle set folder with lora/ and chameleon/ (default: search assets/bundles/)")
    parser.add_argument("--dataset", choices=DATASETS, help="data for a demo set built on first start (default: synthetic, "
                        "or the kind found in --data-dir)")
    parser.add_argument("--data-dir", help="a local copy of the data, e.g. path/to/wikitext-2-raw")
    parser.add_argument("--port", type=int, default=None, help="default 7860 (or GRADIO_SERVER_PORT)")
    parser.add_argument("--build-only", action="store_true", help="build the demo bundle set if needed, then exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    args = parse_args(argv)
    options = dict(model_name=args.model, bundle=args.bundle, root=BUNDLES, dataset=args.dataset, data_dir=args.data_dir)
    if args.build_only:
        print(json.dumps(open_bundle_set(**options).describe(), indent=2))
        return
    serve(build_demo(Engine(**options).start()), server_port=args.port)


if __name__ == "__main__":
    main()
