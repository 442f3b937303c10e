"""Command-line interface: thin click commands over the library."""

import click


@click.group()
@click.version_option(package_name="cbr")
def cli():
    """Case-based reasoning for medical images."""


def main():
    cli()
