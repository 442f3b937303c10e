"""How ``cbr serve`` runs: one frozen dataclass that travels from the CLI to the app."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cbr.errors import CbrError

__all__ = ["ServeSettings", "is_loopback"]

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; False for 0.0.0.0 and every other address."""
    host = (host or "").strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeSettings:
    """Settings of one ``cbr serve`` process.

    Args:
        host, port: where uvicorn listens (loopback by default).
        token: when set, every request must carry it (bearer header, or the login cookie).
        max_upload_mb: the largest accepted request body (an upload), in MiB.
        data_dir: where uploaded query images and their reports are kept (they are the recorded
            image paths of the queries, so they must outlive the process).
        k, vote, explain: defaults of a query; each request may override them. explain None: the
            CAM method of the case base's stored maps, so query and case maps compare.
        models: restrict to these members (names, checkpoint paths or fingerprints).
        secure_cookies: mark cookies Secure (behind an HTTPS proxy).
    """

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_upload_mb: float = 50.0
    data_dir: Path | None = None
    k: int = 5
    vote: str = "weighted"
    explain: str | None = None
    models: tuple = ()
    secure_cookies: bool = False

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def check(self) -> None:
        """Refuse settings that would expose the case base: a non-loopback host needs a token."""
        if self.token is not None and not self.token.strip():
            raise CbrError("--token is empty; give a long random string, e.g. --token \"$(openssl rand -hex 16)\"")
        if not is_loopback(self.host) and not self.token:
            raise CbrError(f"--host {self.host} is not a loopback address; anyone on the network could read the "
                           "case base, so give --token TOKEN (or keep the default --host 127.0.0.1)")
        if self.max_upload_mb <= 0:
            raise CbrError(f"--max-upload-mb {self.max_upload_mb}: give a positive size")
        if not 0 <= self.port <= 65535:
            raise CbrError(f"--port {self.port}: give a port between 1 and 65535 (0 picks a free one)")

    def url(self, port: int | None = None) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{port or self.port}/"
