"""Where `cbr index` decodes, embeds and explains: in this process (``local``) or on a Ray cluster
(``ray``), whose results stream back here to the one writer.

On Ray, the records go through Ray Data's ``map_batches`` with a pool of actors; each actor receives
the writer's own embedders once (serialised with their weights: no machine needs its own copy) and runs
``CaseWriter.compute``: decoding, every member's preprocessing, embeddings and case maps, the same
code as the local engine. The driver writes each returned batch in one transaction, so the
guarantees do not change: an interruption loses at most the batches in flight, a re-run skips what
was stored, and nothing is stored twice. Actors take a GPU each when Ray sees GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbr.data.batches import collate, DecodedRecords
from cbr.errors import CbrError
from cbr.pipeline.settings import ENGINES
from cbr.store.writer import CaseWriter

__all__ = ["ENGINES", "RayNotInstalled", "RaySettings", "ray_batches"]


class RayNotInstalled(CbrError):
    def __init__(self):
        super().__init__("--engine ray needs Ray: install the optional extra with pip install 'cbr[ray]'")


@dataclass(frozen=True)
class RaySettings:
    """What the actors run: the writer's own embedders (shipped whole, weights included, so every
    machine computes with exactly the model the case base registered), the map method, the batch size."""

    embedders: tuple
    explain: str
    batch_size: int


@dataclass
class _Member:
    embedder: object


class _Embedders:
    """A Ray actor: the members' embedders, loaded once, computing whole batches of records."""

    def __init__(self, settings: RaySettings, records: list):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        members = [_Member(emb.to(device).eval()) for emb in settings.embedders]
        # One decoding for every member, with their shared window (index._one_window checked it).
        self.records, self.device, self.window = records, device, members[0].embedder.config.window
        self.writer = CaseWriter(None, members, explain=settings.explain)

    def __call__(self, batch: dict) -> dict:
        decoded = DecodedRecords(self.records, [m.embedder.preprocess for m in self.writer.members], self.window)
        idx, tensors, bad = collate([decoded[int(i)] for i in batch["i"]])
        out = {"i": np.asarray(idx, dtype=np.int64), "embeddings": np.empty(len(idx), dtype=object),
               "maps": np.empty(len(idx), dtype=object)}
        if idx:
            embeddings, maps = self.writer.compute([self.records[i] for i in idx], [t.to(self.device) for t in tensors])
            for j in range(len(idx)):
                out["embeddings"][j] = [e[j] for e in embeddings]
                out["maps"][j] = [None if m is None else m[j] for m in maps]
        # One row per record: the batch's problems ride on rows of their own (index -1 - i).
        if bad:
            out = {"i": np.concatenate([out["i"], [-1 - i for i, _ in bad]]),
                   "embeddings": np.concatenate([out["embeddings"], np.array([None] * len(bad), dtype=object)]),
                   "maps": np.concatenate([out["maps"], np.array([reason for _, reason in bad], dtype=object)])}
        return out


def ray_batches(records: list, settings: RaySettings, address: str | None = None):
    """Yield (record indices, embeddings per member, maps per member, [(index, problem)]) per
    batch, computed on Ray (``address``: a running cluster; None starts or joins a local one)."""
    try:
        import ray
    except ImportError:
        raise RayNotInstalled() from None

    if not records:
        return
    if not ray.is_initialized():
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise CbrError(f"--ray-address {address}: cannot join the Ray cluster ({str(e).splitlines()[0]}); "
                           "start one with `ray start --head`, or leave --ray-address out to run Ray here") from None
    # Case ids follow the order cases are written: keep the records' order, as the local engine does.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    resources = ray.cluster_resources()
    gpus = 1 if resources.get("GPU", 0) >= 1 else 0
    # One actor per GPU, else one per CPU (each holds the embedders); Ray grows the pool as it can.
    most = int(resources.get("GPU", 0)) if gpus else int(resources.get("CPU", 1))
    ds = ray.data.from_items([{"i": i} for i in range(len(records))])
    ds = ds.map_batches(_Embedders, fn_constructor_args=(settings, records), batch_size=settings.batch_size,
                        batch_format="numpy", num_gpus=gpus,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, most)))
    for batch in ds.iter_batches(batch_size=settings.batch_size, batch_format="numpy"):
        ok = batch["i"] >= 0
        idx = batch["i"][ok].tolist()
        rows_e, rows_m = batch["embeddings"][ok], batch["maps"][ok]
        n_members = len(settings.embedders)
        embeddings = [np.stack([row[m] for row in rows_e]) if idx else None for m in range(n_members)]
        maps = [None if not idx or rows_m[0][m] is None else [row[m] for row in rows_m] for m in range(n_members)]
        bad = [(-1 - int(i), str(reason)) for i, reason in zip(batch["i"][~ok], batch["maps"][~ok])]
        yield idx, embeddings, maps, bad
