"""FAISS layer of cbr: free functions over numpy arrays. Never imports cbr."""

from .device import to_device, to_host
from .storage import IndexFileError, checksum, load, save
from .vectors import KINDS, add, brute_force_search, build, ids, remove, search

__all__ = [
    "KINDS",
    "IndexFileError",
    "add",
    "brute_force_search",
    "build",
    "checksum",
    "ids",
    "load",
    "remove",
    "save",
    "search",
    "to_device",
    "to_host",
]
