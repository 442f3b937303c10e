"""Index generations: their file names, and which index folder wrote one.

One PostgreSQL case base may serve several machines, each with its own ``--index-dir``, while the
manifest (one row per model) names the one generation written last. A file that another folder
wrote is absent here by design: the reader builds it from the stored embeddings instead of calling
it damage. So a generation's name carries a tag of the folder that wrote it (this machine and the
folder's inode: nothing is stored for it), and a file missing under this folder's own tag is damage.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import uuid
from pathlib import Path

__all__ = ["generation_name", "written_elsewhere", "folder_tag"]

_NAME = re.compile(r"(?:model|findings)-\d+-(?P<tag>[0-9a-f]{8})-[0-9a-f]{12}\.faiss")  # images' and findings' indexes


def _machine() -> str:
    try:
        with open("/etc/machine-id", encoding="ascii") as fh:
            return fh.read().strip() or socket.gethostname()
    except (OSError, UnicodeDecodeError):
        return socket.gethostname()


def folder_tag(index_dir: Path) -> str | None:
    """This index folder's tag: its machine, device and inode, hashed; None while it does not exist."""
    try:
        st = os.stat(index_dir)
    except OSError:
        return None
    return hashlib.sha256(f"{_machine()}:{st.st_dev}:{st.st_ino}".encode()).hexdigest()[:8]


def generation_name(model_id: int, index_dir: Path) -> str:
    """The file name of a new index generation of ``model_id`` written into ``index_dir`` (which exists)."""
    return f"model-{int(model_id)}-{folder_tag(index_dir)}-{uuid.uuid4().hex[:12]}.faiss"


def written_elsewhere(name: str, index_dir: Path) -> bool:
    """Whether generation ``name`` was written by another index folder (another machine's
    ``--index-dir``); False for this folder's own generations and for untagged (older) names."""
    m = _NAME.fullmatch(name)
    return m is not None and m["tag"] != folder_tag(index_dir)
