"""FAISS layer of cbr: free functions over numpy arrays. Never imports cbr."""

from .device import to_device, to_host
from .halves import to_float32
from .refine import (Sidecar, SidecarError, create_sidecar, exact_scores, link_sidecar, open_sidecar, put_rows,
                     refined_search, remove_sidecar, rename_sidecar, sidecar_exists, sidecar_files)
from .shards import (ShardBuildError, ShardPlan, build_sharded, ivfdata_files, load_sharded, open_index, shardable,
                     sharded, write_sharded)
from .sizing import FAST_SCAN_LARGE_FROM, LARGE_KINDS, auto_kind, factory_for, fast_scan_m, pq_bytes
from .storage import IndexFileError, checksum, load, save
from .vectors import (KINDS, add, brute_force_search, build, fast_scan, ids, learned, lossy, needs_training, remove,
                      search, train, unwrapped)

__all__ = [
    "KINDS",
    "LARGE_KINDS",
    "FAST_SCAN_LARGE_FROM",
    "IndexFileError",
    "ShardBuildError",
    "ShardPlan",
    "build_sharded",
    "ivfdata_files",
    "open_index",
    "shardable",
    "sharded",
    "unwrapped",
    "write_sharded",
    "create_sidecar",
    "exact_scores",
    "link_sidecar",
    "remove_sidecar",
    "rename_sidecar",
    "sidecar_exists",
    "sidecar_files",
    "Sidecar",
    "SidecarError",
    "to_float32",
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
    "fast_scan",
    "fast_scan_m",
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
