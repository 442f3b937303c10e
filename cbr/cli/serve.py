"""``cbr serve``: the web audit workstation."""

import click

from cbr.cli.options import RegistryChoice, cam_names, db_option, index_dir_option
from cbr.lazy_import import LazyModule
from cbr.serve.settings import DEFAULT_METHODS, ServeSettings

serve_server = LazyModule("cbr.serve.server")  # web-bound (FastAPI, uvicorn): loads on first use


@click.command("serve")
@db_option
@index_dir_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port (0: any free one).")
@click.option("--token", envvar="CBR_TOKEN", default=None, show_envvar=True,
              help="Require this token on every request (bearer header, or the login page).")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=50, show_default=True,
              help="Largest accepted upload.")
@click.option("-k", "k", type=click.IntRange(1, 1000), default=5, show_default=True, help="Default neighbours per member.")
@click.option("--explain", "explain", type=RegistryChoice(cam_names, extra=("none",)), default=None,
              help="Default CAM method of the query maps [default: the method of the case base's stored maps].")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where uploaded images and reports are kept [default: beside the case base, DB.serve/].")
@click.option("--pseudonymise", default=None, metavar="KEY", envvar="CBR_PSEUDONYMISE_KEY", show_envvar=True,
              help="The key of a pseudonymised case base (as given to cbr index): the patient field and a DICOM "
                   "upload's PatientID are hashed with it. Required by such a case base; never stored.")
@click.option("--allow-burned-in", is_flag=True,
              help="Accept DICOM uploads marked BurnedInAnnotation=YES [default: refuse them].")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also answer requests whose Host is NAME (repeatable); loopback names and --host always are. "
                   "Any other Host gets 400, so a DNS-rebinding web page cannot reach the server.")
@click.option("--max-k", type=click.IntRange(1, 1000), default=100, show_default=True,
              help="The most neighbours a request may ask for.")
@click.option("--allow-methods", default=",".join(DEFAULT_METHODS), show_default=True, metavar="M1,M2|all",
              callback=lambda ctx, param, value: tuple(m.strip() for m in value.split(",") if m.strip()),
              help="Explanation methods a request may ask for; 'all' adds Score-CAM and the attribution methods "
                   "(lime, kernelshap, occlusion...), which run one at a time in a lane of their own, so plain "
                   "queries never wait for them.")
@click.option("--explain-budget", type=click.IntRange(min=1), default=200, show_default=True,
              help="Model evaluations per attribution map (lime samples, occlusion positions...).")
@click.option("--explain-neighbours", type=click.IntRange(min=0), default=20, show_default=True,
              help="Neighbours that get a similarity map (the first N of k).")
@click.option("--max-decodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Uploads decoded at once; each may take up to the decoded-size budget (cbr --max-decoded-mb).")
@click.option("--session-hours", type=click.FloatRange(min=0, min_open=True), default=8, show_default=True,
              help="How long a login lasts.")
@click.option("--session-key", envvar="CBR_SESSION_KEY", default=None, show_envvar=True,
              help="Key that signs login sessions, so they survive a restart [default: a new random key each start].")
def serve_cmd(db, index_dir, host, port, token, max_upload_mb, k, explain, data_dir, pseudonymise, allow_burned_in,
              allowed_hosts, max_k, allow_methods, explain_budget, explain_neighbours, max_decodes, session_hours,
              session_key):
    """Serve a case base to a browser: query, compare neighbours and maps, refine, give feedback.

    The members are loaded once and stay warm; queries are recorded in the case base exactly as
    `cbr query` records them. It listens on loopback unless --host says otherwise, and then it
    needs --token. It answers only requests addressed to its own names (loopback, --host,
    --allowed-host). /healthz shows its limits.

    \b
    Example:
        cbr serve --db cases.db
        cbr serve --db cases.db --port 9000 --max-upload-mb 20
        cbr serve --db cases.db --host 0.0.0.0 --token "$(openssl rand -hex 16)" --allowed-host cbr.example.org
        cbr serve --db cases.db --allow-methods gradcam,lime --explain-budget 100 --max-k 50
        CBR_PSEUDONYMISE_KEY="$KEY" cbr serve --db pseudonymised.db
    """
    settings = ServeSettings(host=host, port=port, token=token, max_upload_mb=max_upload_mb, k=k,
                             explain=explain, data_dir=data_dir, pseudonymise=pseudonymise,
                             allow_burned_in=allow_burned_in, allowed_hosts=allowed_hosts, max_k=max_k,
                             allow_methods=allow_methods, explain_budget=explain_budget,
                             explain_neighbours=explain_neighbours, max_decodes=max_decodes,
                             session_hours=session_hours, session_key=session_key)
    serve_server.run_server(db, settings, index_dir=index_dir, log=click.echo)
