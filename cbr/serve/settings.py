"""How ``cbr serve`` runs: one frozen dataclass that travels from the CLI to the app."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from cbr.errors import CbrError
from explain.methods import METHOD_NAMES

__all__ = ["ServeSettings", "is_loopback", "host_name", "check_host_name", "DEFAULT_METHODS"]

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # always allowed as the Host of a request
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")  # a DNS name, letters digits dashes dots
# Explanations a request may ask for by default: the gradient CAMs (one backward pass a map) and
# none. Score-CAM and the attribution methods run the model hundreds of times a map: --allow-methods.
DEFAULT_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "layercam-fused", "none")


def host_name(host: str) -> str:
    """A host as a Host header names it: an IPv6 address in brackets, any other name as it is."""
    host = (host or "").strip()
    bare = host.strip("[]")
    try:
        return f"[{bare}]" if ipaddress.ip_address(bare).version == 6 else bare
    except ValueError:
        return host


def check_host_name(name: str) -> None:
    """Refuse an ``--allowed-host`` that is no plain host name (a wildcard, a URL, a port)."""
    bare = (name or "").strip().strip("[]")
    try:
        ipaddress.ip_address(bare)
        return
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(bare):
        raise CbrError(f"--allowed-host {name!r}: give a host name or address as browsers send it, without "
                       "scheme, port or wildcard (e.g. --allowed-host cbr.example.org)")


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
        allowed_hosts: Host names (besides loopback and ``host``) the server answers to; any
            other Host header gets 400, so a DNS-rebinding page cannot reach it.
        max_decodes: uploads decoded at once (each may take up to the decoded-size budget).
        max_k: the most neighbours a request may ask for.
        allow_methods: explanation methods a request may ask for (``all``: every method).
        explain_budget: model evaluations per attribution map (lime, kernelshap, occlusion...).
        explain_neighbours: neighbours that get similarity maps (the first n of k).
        session_hours: how long a login lasts.
        session_key: signs the login sessions; None: a new random key each start, so a restart
            logs everyone out.
        pseudonymise: the key of a pseudonymised case base (``--pseudonymise`` or
            ``CBR_PSEUDONYMISE_KEY``): the ``patient`` field and a DICOM upload's PatientID are
            hashed with it; the server refuses to start without it, or with another key.
        allow_burned_in: accept DICOM uploads marked BurnedInAnnotation=YES.
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
    allowed_hosts: tuple = ()
    max_decodes: int = 1
    max_k: int = 100
    allow_methods: tuple = DEFAULT_METHODS
    explain_budget: int | None = 200
    explain_neighbours: int | None = 20
    session_hours: float = 8.0
    session_key: str | None = field(default=None, repr=False)  # never in a log or traceback
    pseudonymise: str | None = field(default=None, repr=False)  # never in a log or traceback
    allow_burned_in: bool = False

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def trusted_hosts(self) -> tuple[str, ...]:
        """The Host names this server answers to: loopback, ``host`` and ``allowed_hosts``."""
        names = [*LOOPBACK_HOSTS, host_name(self.host), *(host_name(h) for h in self.allowed_hosts)]
        return tuple(dict.fromkeys(n.lower() for n in names))

    @property
    def methods(self) -> tuple[str, ...]:
        """The explanation methods a request may ask for, in registry order."""
        wanted = set(self.allow_methods)
        return tuple(m for m in (*METHOD_NAMES, "none") if "all" in wanted or m in wanted)

    def limits(self) -> dict:
        """What ``/healthz`` shows a client about this server's limits."""
        return {"max_k": self.max_k, "allow_methods": list(self.methods), "explain_budget": self.explain_budget,
                "explain_neighbours": self.explain_neighbours, "max_decodes": self.max_decodes,
                "max_upload_mb": self.max_upload_mb, "session_hours": self.session_hours}

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
        for name in self.allowed_hosts:
            check_host_name(name)
        self._check_limits()

    def _check_limits(self) -> None:
        for option, value in (("--max-decodes", self.max_decodes), ("--max-k", self.max_k),
                              ("--explain-budget", 1 if self.explain_budget is None else self.explain_budget),
                              ("--session-hours", self.session_hours)):
            if not value > 0:
                raise CbrError(f"{option} {value}: give a positive number")
        if self.explain_neighbours is not None and self.explain_neighbours < 0:
            raise CbrError(f"--explain-neighbours {self.explain_neighbours}: give 0 or more")
        if self.k > self.max_k:
            raise CbrError(f"-k {self.k} is more than --max-k {self.max_k}; lower -k or raise --max-k")
        unknown = sorted(set(self.allow_methods) - {*METHOD_NAMES, "none", "all"})
        if unknown:
            raise CbrError(f"--allow-methods: unknown method {unknown[0]!r}; choose from all, none, "
                           f"{', '.join(METHOD_NAMES)}")
        if self.explain is not None and self.explain not in self.methods:
            raise CbrError(f"--explain {self.explain} is not in --allow-methods; add it there")
        if self.session_key is not None and len(self.session_key) < 16:
            raise CbrError("--session-key is too short; give at least 16 random characters, "
                           "e.g. \"$(openssl rand -hex 32)\"")

    def url(self, port: int | None = None) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{port or self.port}/"
