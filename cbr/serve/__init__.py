"""``cbr serve``: a web audit workstation over one case base, with its models kept warm.

``create_app(casebase, settings)`` builds the FastAPI app; ``run_server`` is what the CLI calls.
"""

from cbr.serve.app import create_app
from cbr.serve.server import run_server
from cbr.serve.settings import ServeSettings

__all__ = ["create_app", "ServeSettings", "run_server"]

