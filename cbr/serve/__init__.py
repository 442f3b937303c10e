"""``cbr serve``: a web audit workstation over one case base, with its models kept warm.

``create_app(casebase, settings)`` builds the FastAPI app; ``run_server`` is what the CLI calls.
"""

__all__ = ["create_app", "ServeSettings", "run_server"]


def __getattr__(name):
    # FastAPI and the models load only when the server is wanted, never for `cbr --help`.
    if name == "create_app":
        from cbr.serve.app import create_app

        return create_app
    if name == "ServeSettings":
        from cbr.serve.settings import ServeSettings

        return ServeSettings
    if name == "run_server":
        from cbr.serve.server import run_server

        return run_server
    raise AttributeError(name)
