"""Moving indexes between host memory and a GPU, when faiss was built with GPU support."""

import logging


LOG = logging.getLogger(__name__)

# One resources object per process: each holds scratch memory on the device, so making one per
# index would waste GPU memory and time.
_RESOURCES = None


def gpu_available():
    """True when this faiss has GPU support and sees at least one GPU."""
    import faiss

    # faiss-cpu has neither StandardGpuResources nor a useful get_num_gpus, so check both.
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return faiss.get_num_gpus() > 0
    except (AttributeError, RuntimeError):
        return False


def on_device(index):
    """True when the index (or the index inside its id map) lives on a GPU."""
    import faiss

    inner = getattr(index, "index", index)
    return type(faiss.downcast_index(inner)).__name__.startswith("Gpu")


def to_device(index):
    """Return a GPU copy of a flat index when a GPU is available, else the index itself.

    Only exact flat indexes move: a GPU flat search is exact and fast, while HNSW has no GPU
    version and IVF on GPU would change recall and memory behaviour behind the caller's back.

    Args:
        index: an `IndexIDMap2` built by `index.build` or read by `index.load`.
    """
    import faiss

    if not gpu_available() or on_device(index):
        return index
    inner = faiss.downcast_index(getattr(index, "index", index))
    if not isinstance(inner, faiss.IndexFlat):
        return index
    global _RESOURCES
    if _RESOURCES is None:
        _RESOURCES = faiss.StandardGpuResources()
    # The cloner keeps the id map on the host and moves only the inner flat index.
    LOG.info("moving flat index with %d vectors to GPU 0", index.ntotal)
    return faiss.index_cpu_to_gpu(_RESOURCES, 0, index)


def to_host(index):
    """Return a CPU copy of an index that lives on a GPU, else the index itself."""
    import faiss

    if not on_device(index):
        return index
    return faiss.index_gpu_to_cpu(index)
