"""``cbr serve``: the web audit workstation."""

import click

from cbr.cli.group import cli
from cbr.cli.options import RegistryChoice, cam_names, db_option, index_dir_option


@cli.command("serve")
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
def serve_cmd(db, index_dir, host, port, token, max_upload_mb, k, explain, data_dir):
    """Serve a case base to a browser: query, compare neighbours and maps, refine, give feedback.

    The members are loaded once and stay warm; queries are recorded in the case base exactly as
    `cbr query` records them. It listens on loopback unless --host says otherwise, and then it
    needs --token.

    \b
    Example:
        cbr serve --db cases.db
        cbr serve --db cases.db --port 9000 --max-upload-mb 20
        cbr serve --db cases.db --host 0.0.0.0 --token "$(openssl rand -hex 16)"
    """
    from cbr.serve.server import run_server
    from cbr.serve.settings import ServeSettings

    settings = ServeSettings(host=host, port=port, token=token, max_upload_mb=max_upload_mb, k=k,
                             explain=explain, data_dir=data_dir)
    run_server(db, settings, index_dir=index_dir, log=click.echo)
