"""``cbr models``: what the registries offer."""

import json

import click

from cbr.cli.options import json_option
from cbr.models.backbones import BACKBONES, TIMM_FORM, TIMM_INSTALL
from cbr.models.lite import LITE_INSTALL
from cbr.models.weights import offline_weights_path, weights_file_name
from cbr.pipeline.vote import ENSEMBLES, VOTE_RULES
from explain.methods import ATTRIBUTION_METHODS, FAST_METHODS, METHOD_NAMES


@click.command("models")
@json_option
def models_cmd(as_json):
    """List the backbones, CAM methods and vote rules, and which ImageNet weights are offline.

    \b
    Example:
        cbr models
        TORCH_HOME=/data/weights cbr models --json
    """
    import importlib.util

    rows = []
    for name, spec in BACKBONES.items():
        file = weights_file_name(name) if spec.has_imagenet else None
        path = offline_weights_path(name) if file else None
        rows.append({"backbone": name, "input_size": spec.input_size, "embedding_dim": spec.embedding_dim,
                     "imagenet_file": file, "offline": path is not None, "path": str(path) if path else None,
                     "package": spec.weights_package.partition("/")[0].replace("_", "-") or None})
    # find_spec, not an import: timm takes seconds to import and cbr models stays instant.
    timm = {"form": TIMM_FORM, "installed": importlib.util.find_spec("timm") is not None,
            "install": TIMM_INSTALL}
    info = {"backbones": rows, "timm": timm,
            "cam_methods": [{"name": m, "fast_path": m in FAST_METHODS} for m in METHOD_NAMES],
            "vote_rules": list(VOTE_RULES), "ensembles": list(ENSEMBLES)}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{'backbone':<20} {'input':>5} {'dim':>5}  imagenet weights")
    for r in rows:
        state = "-" if not r["imagenet_file"] else f"{r['imagenet_file']} ({_source(r)})"
        click.echo(f"{r['backbone']:<20} {r['input_size']:>5} {r['embedding_dim']:>5}  {state}")
    click.echo(f"{TIMM_FORM:<20} any model of timm.list_models(), size and mean/std from its pretrained config; "
               + ("timm is installed" if timm["installed"] else f"not installed: {timm['install']}"))
    click.echo("explanation methods: " + ", ".join(
        m + ("" if m in FAST_METHODS else " (captum)" if m in ATTRIBUTION_METHODS else " (hooked path)")
        for m in METHOD_NAMES))
    click.echo("vote rules:  " + ", ".join(VOTE_RULES) + ";  ensembles: " + ", ".join(ENSEMBLES))


def _source(row: dict) -> str:
    """Where a backbone's ImageNet file is read from, or how to get it."""
    if row["path"]:
        return f"from {row['path']}"
    if row["package"]:
        return f"not installed: {LITE_INSTALL}"
    return "not cached"
