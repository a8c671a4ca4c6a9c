"""The 2-D map of conditioning embeddings: the training points fitted once, new prompts placed on it.

The demo page and notebook 02 draw it; nothing in training or inference reads it. UMAP (PCA for a
handful of points) is slow to fit, so a fitted map is cached in memory and on disk by content.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .models import default_cache_dir

MIN_UMAP_POINTS = 30  # fewer training points than this are projected with PCA
_PROJECTIONS: dict[str, Projection] = {}
_PROJECTION_LOCK = threading.Lock()
_TRANSFORM_LOCK = threading.Lock()  # UMAP's transform is not safe to run from two threads at once


@dataclass
class Projection:
    """A 2-D map fitted once on training embeddings; ``transform`` places new prompts on it."""

    method: str  # "umap" or "pca"
    reducer: object
    coords: np.ndarray  # (n, 2) the training points

    def transform(self, embeddings: torch.Tensor) -> np.ndarray:
        """(N, 2) map coordinates of new inputs, next to the training points' ``coords``."""
        with _TRANSFORM_LOCK:
            return np.asarray(self.reducer.transform(embeddings.float().cpu().numpy()))


def fit_projection(embeddings: torch.Tensor, seed: int = 0, cache_dir: str | Path | None = None) -> Projection:
    """UMAP (PCA below ``MIN_UMAP_POINTS`` points), cached in memory and on disk by content.

    The disk cache lives in the user's cache folder, never in a bundle: it is a pickle, and a
    bundle is data that may come from anyone.
    """
    points = embeddings.float().cpu().numpy()
    method = "umap" if len(points) >= MIN_UMAP_POINTS else "pca"
    key = hashlib.blake2b(f"{method}:{seed}:{points.shape}".encode() + points.tobytes(), digest_size=16).hexdigest()
    file = Path(cache_dir or default_cache_dir()) / "projections" / f"{key}.pkl"
    with _PROJECTION_LOCK:
        if key in _PROJECTIONS:
            return _PROJECTIONS[key]
        projection = _cached_projection(file)
        if projection is None:
            if method == "umap":
                import umap

                reducer = umap.UMAP(n_neighbors=15, random_state=seed, n_jobs=1)
            else:
                from sklearn.decomposition import PCA

                reducer = PCA(n_components=min(2, *points.shape), random_state=seed)
            coords = reducer.fit_transform(points)
            projection = Projection(method, reducer, np.pad(coords, ((0, 0), (0, 2 - coords.shape[1]))))
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(projection))
            tmp.replace(file)
        _PROJECTIONS[key] = projection
        return projection


def _cached_projection(file: Path) -> Projection | None:
    """The projection pickled in ``file``, or None when it is absent or unreadable: written by another
    version of this code (a class that moved), by other library versions, or cut short."""
    try:
        projection = pickle.loads(file.read_bytes())
    except Exception:  # noqa: BLE001 (absent, or any unpickling failure: a cache miss, the map is refitted)
        return None
    return projection if isinstance(projection, Projection) else None
