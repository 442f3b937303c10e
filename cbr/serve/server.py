"""Running the app under uvicorn: load once, say where, stop cleanly on Ctrl-C."""

from __future__ import annotations

import logging
import socket
import time

import uvicorn

from cbr.errors import CbrError
from cbr.serve.app import create_app
from cbr.store.casebase import open_casebase

__all__ = ["run_server"]

LOG = logging.getLogger(__name__)


def run_server(db, settings, *, index_dir=None, log=print) -> None:
    """Open a case base, load its members once, and serve it until interrupted.

    Args:
        db: the case base (a SQLite path or SQLAlchemy URL).
        settings: a ServeSettings (checked first: a non-loopback host needs a token).
        index_dir: where its FAISS files are, when not beside the case base.
        log: where the start-up lines go.

    Example:
        >>> run_server("cases.db", ServeSettings(port=8765))
    """
    settings.check()
    t0 = time.perf_counter()
    cb = open_casebase(db, create=False, index_dir=index_dir)
    try:
        app = create_app(cb, settings)
        wb = app.state.workbench
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((settings.host, settings.port))
            sock.listen(2048)  # connections made once the URL is printed wait for uvicorn instead of failing
        except OSError as e:
            raise CbrError(f"cannot listen on {settings.host}:{settings.port} ({e.strerror or e}); "
                           "choose another --port or stop the process using it") from None
        port = sock.getsockname()[1]
        loaded = time.perf_counter() - t0
        warm = wb.warm_up()
        log(f"cbr serve: {cb.display}, {len(wb.members)} member(s) loaded in {loaded:.1f} s, warmed up in {warm:.1f} s")
        for note in wb.searcher.notes:
            log(f"  note: {note}")
        log(f"  uploads and reports: {wb.data_dir}")
        log(f"  answers to Host {', '.join(settings.trusted_hosts)} "
            "(any other gets 400; add names with --allowed-host)")
        log(f"  open {settings.url(port)}" + ("  (log in with the token)" if settings.token else ""))
        log("  Ctrl-C stops it")
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            # uvicorn has already shut down gracefully; it re-raises the captured Ctrl-C afterwards.
            pass
    finally:
        cb.close()
    log("cbr serve: stopped")
