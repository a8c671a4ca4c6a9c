"""A training run's folder on disk: what it holds, whether it finished, and its records.

``train`` writes a run into a folder, ``--resume`` continues it from ``checkpoint.pt`` and
``reproduce`` skips it once ``metrics.json`` says it finished. What a folder holds, whether its
records match a configuration, and how they are written are decided here, so that no run is
lost or mistaken for another.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .train import TrainConfig

ROWS_FILE = "rows.json"  # beside metrics.json: every evaluated row's loss, for paired comparisons

# The files that mark a folder as holding a run, newest state first.
RUN_RECORDS = {
    "checkpoint.pt": "an unfinished run (checkpoint.pt)",
    "metrics.json": "a finished run (metrics.json)",
    "config.json": "a bundle (config.json)",
}


@dataclass
class RecordedRun:
    """The newest record of a run in a folder: its checkpoint, else its metrics, else its bundle."""

    what: str  # one of RUN_RECORDS' descriptions
    config: dict | None  # its TrainConfig as a dict; None for a bundle not written by ``train``
    checkpoint: dict | None = None  # the loaded checkpoint, to resume from

    def describe(self, config: TrainConfig) -> str:
        """``what: lr: 0.0005 -> 0.01, batch_size: 1000 -> 32`` (recorded -> requested)."""
        if self.config is None:
            return f"{self.what}, which records no training configuration"
        recorded, wanted = _recorded_config(self.config, config), config_dict(config)

        def show(values: dict, key: str) -> str:
            return repr(values[key]) if key in values else "(not set)"

        changed = [key for key in {**wanted, **recorded} if show(recorded, key) != show(wanted, key)]
        return f"{self.what}: " + ", ".join(f"{key}: {show(recorded, key)} -> {show(wanted, key)}" for key in changed)


def config_dict(config: TrainConfig) -> dict:
    """``config`` as its records hold it (JSON types: tuples become lists), so recorded and requested compare equal."""
    return json.loads(json.dumps(asdict(config)))


def _recorded_config(recorded: dict | None, config: TrainConfig) -> dict | None:
    """A recorded run's configuration; settings added since it was recorded read as their defaults."""
    return None if recorded is None else json.loads(json.dumps({**config_dict(type(config)()), **recorded}))


def run_folder(out: str | Path, config: TrainConfig, resume: bool, overwrite: bool) -> tuple[Path, RecordedRun | None]:
    """``out`` ready for a run of ``config``, and with ``resume`` the record it continues (None for an empty folder).

    Nothing is lost silently: ``resume`` refuses a folder made with another configuration, and a fresh
    run refuses a folder that already holds a run unless ``overwrite``. All before any model is loaded.
    """
    out = _usable_folder(out)
    if not resume and not overwrite and (held := _held_run(out)):
        raise ValueError(
            f"{out} already holds {held}; pass --overwrite to replace it, --resume to continue it with the same "
            "settings, or choose another --out"
        )
    recorded = _recorded_run(out) if resume else None
    if recorded and _recorded_config(recorded.config, config) != config_dict(config):
        raise ValueError(
            f"{out} holds a run made with a different configuration ({recorded.describe(config)}); resume with its "
            "settings, choose another --out, or pass --overwrite without --resume to replace it"
        )
    return out, recorded


def finished_run(out: Path, config: TrainConfig) -> dict | None:
    """The metrics of a completed run of exactly ``config`` in ``out``, else None."""
    path = Path(out) / "metrics.json"
    if not path.is_file():
        return None
    done = _read_json(path)
    return done if done.get("complete") and _recorded_config(done.get("config"), config) == config_dict(config) else None


def save_checkpoint(out: Path, state: dict) -> None:
    """Write ``checkpoint.pt`` whole or not at all: a run stopped while saving resumes from the previous epoch."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    tmp = checkpoint.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(checkpoint)


def clear_run(out: Path) -> None:
    """Remove the checkpoint and results of a run being replaced, so that none outlives it as this run's."""
    for name in ("checkpoint.pt", "metrics.json", "metrics.csv", ROWS_FILE):
        (out / name).unlink(missing_ok=True)


def write_finished_run(out: Path, result: dict, rows: dict) -> None:
    """Mark the run finished: its per-row losses, its metrics (JSON, and each epoch as CSV), then no checkpoint."""
    (out / ROWS_FILE).write_text(json.dumps(rows))
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "train_loss", "val_loss", "val_ppl", "seconds"])
        writer.writeheader()
        for row in result["history"]:
            writer.writerow({k: row[k] for k in writer.fieldnames})
    (out / "checkpoint.pt").unlink(missing_ok=True)


def _held_run(out: Path) -> str | None:
    """What kind of run ``out`` already holds (see :data:`RUN_RECORDS`), or None."""
    return next((what for name, what in RUN_RECORDS.items() if (out / name).is_file()), None)


def _recorded_run(out: Path) -> RecordedRun | None:
    """The newest record of a run in ``out`` with its configuration, or None for a folder without a run."""
    what = _held_run(out)
    if what == RUN_RECORDS["checkpoint.pt"]:
        checkpoint = out / "checkpoint.pt"
        try:
            state = torch.load(checkpoint, weights_only=False)
            return RecordedRun(what, state["config"], state)
        except (RuntimeError, EOFError, OSError, KeyError, TypeError, pickle.UnpicklingError) as err:
            raise ValueError(
                f"{checkpoint} is unreadable ({str(err).splitlines()[0][:120]}); pass --overwrite without --resume "
                "to start the run over"
            ) from None
    if what == RUN_RECORDS["metrics.json"]:
        return RecordedRun(what, _read_json(out / "metrics.json").get("config"))
    if what == RUN_RECORDS["config.json"]:
        return RecordedRun(what, (_read_json(out / "config.json").get("metadata") or {}).get("train"))
    return None


def _read_json(path: Path) -> dict:
    """A run folder's JSON record, or a ValueError that names the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}); pass --overwrite without --resume to start the run over") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no JSON object; pass --overwrite without --resume to start the run over")
    return data


def _usable_folder(out: str | Path) -> Path:
    """``out`` as an existing, writable folder, or a ValueError before any model is loaded."""
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"the run folder (--out) {out} is a file; choose a folder") from None
    except NotADirectoryError:
        file = next((p for p in out.parents if p.is_file()), out.parent)
        raise ValueError(f"the run folder (--out) {out} lies under {file}, which is a file, not a folder") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise ValueError(f"cannot create the run folder (--out) {out}: {getattr(err, 'strerror', None) or err}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to the run folder (--out) {out}: permission denied")
    return out
