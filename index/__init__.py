"""FAISS layer of cbr: free functions over numpy arrays. Never imports cbr."""

from .device import to_device, to_host
from .refine import create_sidecar, open_sidecar, put_rows, refined_search
from .shards import ShardBuildError, ShardPlan, build_sharded, load_sharded
from .sizing import LARGE_KINDS, auto_kind, factory_for, pq_bytes
from .storage import IndexFileError, checksum, load, save
from .vectors import KINDS, add, brute_force_search, build, ids, learned, lossy, needs_training, remove, search, train

__all__ = [
    "KINDS",
    "LARGE_KINDS",
    "IndexFileError",
    "ShardBuildError",
    "ShardPlan",
    "build_sharded",
    "create_sidecar",
    "load_sharded",
    "open_sidecar",
    "put_rows",
    "refined_search",
    "add",
    "auto_kind",
    "brute_force_search",
    "build",
    "checksum",
    "factory_for",
    "ids",
    "learned",
    "lossy",
    "load",
    "needs_training",
    "pq_bytes",
    "remove",
    "save",
    "search",
    "to_device",
    "to_host",
    "train",
]
