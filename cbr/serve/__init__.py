"""``cbr serve``: a web audit workstation over one case base, with its models kept warm.

``cbr.serve.app.create_app(casebase, settings)`` builds the FastAPI app;
``cbr.serve.server.run_server`` is what the CLI calls. This package file imports neither: the
web stack (FastAPI, Starlette, uvicorn) takes over half a second to load, and `cbr serve --help`
and the settings' checks need none of it.
"""
