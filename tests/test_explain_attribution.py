"""Captum attributions (lime, kernelshap, deeplift, integrated-gradients, occlusion) for class and
similarity targets; the method registry; `cbr query --explain lime` and `cbr explain`."""

import json

import numpy as np
import pytest
import torch
from sqlalchemy import select
from torch import nn

from conftest import invoke
from explain.attribution import attribution_maps, map_resolution
from explain.methods import ATTRIBUTION_METHODS, METHOD_NAMES, check_method, is_attribution
from explain.spec import MAX_SPEC_LENGTH, AttributionSettings, parse_spec, resolve_spec
from explain.superpixels import grid_segments, segment
from explain.targets import ClassTarget, SimilarityTarget

METHODS = list(ATTRIBUTION_METHODS)
# Small budgets keep each map to a few dozen tiny-CNN evaluations.
FAST = AttributionSettings(samples=40, segments=16, steps=8, batch_size=16)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    from cbr.models.embedder import create_embedder

    return create_embedder("tinycnn", weights="none", input_size=32, class_names=["a", "b", "c"])


def _model_and_targets(embedder, kind, x):
    if kind == "class":
        return nn.Sequential(embedder.trunk, embedder.classifier_head()), [ClassTarget(i % 3) for i in range(len(x))]
    with torch.no_grad():
        others = embedder.neck(embedder.trunk(x.roll(1, dims=0)))
    return nn.Sequential(embedder.trunk, embedder.neck), [SimilarityTarget(e) for e in others]


# --- every method, both targets, on the tiny CNN ---------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["class", "similarity"])
@pytest.mark.parametrize("method", METHODS)
def test_map_is_finite_with_the_documented_shape(tiny, method, kind):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model, targets = _model_and_targets(tiny, kind, x)
    seen = []
    maps, spec = attribution_maps(model, x, targets, method, settings=FAST,
                                  progress=lambda done, total, ev: seen.append((done, total, ev)))
    r = map_resolution(32, FAST)
    assert maps.shape == (3, r, r) and maps.dtype == np.float32
    assert np.all(np.isfinite(maps)) and maps.min() >= 0
    assert maps.max() > 0, f"{method} gave an all-zero {kind} map"
    # The spec records the parameters and reads back to them.
    assert len(spec) <= MAX_SPEC_LENGTH and parse_spec(spec)[0] == method
    assert resolve_spec(spec, 32) == spec
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    assert seen[-1][2] > 0 and seen[0][2] < seen[-1][2]


def test_spec_records_the_budget():
    assert resolve_spec("lime", 224) == "lime(n=200,seg=slic50)"
    assert resolve_spec("lime", 224, budget=50) == "lime(n=50,seg=slic50)"
    assert resolve_spec("integrated-gradients", 224, budget=10) == "integrated-gradients(n=10)"
    assert resolve_spec("occlusion", 224) == "occlusion(w=28,s=14)"
    name, s = parse_spec(resolve_spec("occlusion", 224, budget=100))
    assert ((224 - s.window) // s.stride + 1) ** 2 <= 100
    assert resolve_spec("gradcam", 224, budget=5) == "gradcam"
    with pytest.raises(ValueError, match="unknown parameter"):
        parse_spec("lime(q=3)")


@pytest.mark.parametrize("method", ["lime", "kernelshap", "occlusion", "integrated-gradients"])
def test_budget_caps_the_evaluations(tiny, method):
    x = torch.randn(1, 3, 32, 32)
    model, targets = _model_and_targets(tiny, "class", x)
    seen = []
    attribution_maps(model, x, targets, method, budget=12, progress=lambda d, t, ev: seen.append(ev))
    # +1: lime/kernelshap/occlusion also score the intact image once.
    assert seen[-1] <= 12 + 1


def test_segmentations_label_every_pixel():
    labels = grid_segments((32, 32), 16)
    assert labels.shape == (32, 32) and set(np.unique(labels)) == set(range(16))
    image = torch.rand(3, 32, 32)
    slic = segment(image, 12, "slic")
    assert slic.shape == (32, 32) and slic.min() == 0 and len(np.unique(slic)) == slic.max() + 1
    with pytest.raises(ValueError, match="choose from slic, grid"):
        segment(image, 12, "watershed")


# --- planted signal: the label depends only on a known patch ---------------------------------

PATCH = (slice(8, 16), slice(8, 16))  # an 8x8 patch: one cell of a 4x4 grid over 32x32


class _PatchOnly(nn.Module):
    """Zeroes everything outside the patch: nothing else can reach the output."""

    def __init__(self):
        super().__init__()
        mask = torch.zeros(1, 1, 32, 32)
        mask[(..., *PATCH)] = 1
        self.register_buffer("mask", mask)

    def forward(self, x):
        return x * self.mask


def _planted_model():
    """Hand-set weights: channels 0-2 pool red, green, blue over a 3x3 window, channel 3 their sum;
    only the patch survives; the embedding is their mean over the image plus a constant "blue"
    offset; class 0's logit is the embedding's sum.

    The offset makes the cosine depend on how much of the patch there is: without it a uniform
    patch has the same direction whatever part of it is removed, and a cosine ignores scale.
    """
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    offset = nn.Linear(4, 4)
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(3):
            conv.weight[c, c] = 1 / 9
        conv.weight[3] = 1 / 27
        offset.weight.copy_(torch.eye(4))
        offset.bias.copy_(torch.tensor([0.0, 0.0, 0.05, 0.0]))
    trunk = nn.Sequential(conv, nn.ReLU(), _PatchOnly())
    neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), offset)
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]]))
        head.bias.zero_()
    return trunk.eval(), neck.eval(), head.eval()


def _planted_image(colour, seed):
    g = torch.Generator().manual_seed(seed)
    image = 0.3 * torch.rand(3, 32, 32, generator=g)  # a dim, textured background
    image[(slice(None), *PATCH)] = torch.tensor(colour).view(3, 1, 1) + 0.02 * torch.rand(3, 8, 8, generator=g)
    return image


@pytest.mark.parametrize("kind", ["class", "similarity"])
@pytest.mark.parametrize("method", METHODS)
def test_planted_patch_gets_most_of_the_mass(method, kind):
    trunk, neck, head = _planted_model()
    x = torch.stack([_planted_image((0.5, 0.3, 0.1), 0), _planted_image((0.4, 0.3, 0.2), 1)])
    if kind == "class":
        model, targets = nn.Sequential(trunk, neck, head), [ClassTarget(0)] * 2
    else:
        # The neighbour's patch has the same hue, brighter: the cosine grows with every patch pixel
        # present (from the offset's direction toward the reference's), and with nothing else.
        reference = neck(trunk(_planted_image((1.0, 0.6, 0.2), 2).unsqueeze(0)))[0].detach()
        model, targets = nn.Sequential(trunk, neck), [SimilarityTarget(reference)] * 2
    settings = AttributionSettings(samples=120, segments=16, steps=16, window=4, stride=2, resolution=32)
    maps, _ = attribution_maps(model, x, targets, method, settings=settings)
    inside = np.zeros((32, 32), dtype=bool)
    inside[PATCH] = True
    for m in maps:
        share = m[inside].sum() / m.sum()
        assert share > 0.5, f"{method} put {share:.2f} of its {kind} map on the planted patch"


def test_planted_patch_with_slic_superpixels():
    trunk, neck, head = _planted_model()
    x = _planted_image((1.0, 0.6, 0.2), 0).unsqueeze(0)
    settings = AttributionSettings(samples=150, segments=30, segmentation="slic", resolution=32)
    maps, spec = attribution_maps(nn.Sequential(trunk, neck, head), x, [ClassTarget(0)], "lime", settings=settings)
    assert spec == "lime(n=150,seg=slic30)"
    inside = np.zeros((32, 32), dtype=bool)
    inside[PATCH] = True
    assert maps[0][inside].sum() / maps[0].sum() > 0.5


# --- registry, CLI choices and docs agree ----------------------------------------------------

def test_registry_names_and_checks():
    assert METHOD_NAMES[-len(ATTRIBUTION_METHODS):] == tuple(ATTRIBUTION_METHODS)
    assert len(set(METHOD_NAMES)) == len(METHOD_NAMES)
    for name in METHOD_NAMES:
        assert check_method(name) == name
        assert is_attribution(name) == (name in ATTRIBUTION_METHODS)
        assert is_attribution(resolve_spec(name, 224)) == (name in ATTRIBUTION_METHODS)
    with pytest.raises(ValueError, match="unknown explanation method 'shap'; choose from gradcam"):
        check_method("shap")


@pytest.mark.parametrize("command", [("query",), ("index",), ("explain",)])
def test_cli_choices_come_from_the_registry(runner, command):
    from cbr.cli import cli

    cmd = cli.get_command(None, command[0])
    option = next(p for p in cmd.params if p.name in ("explain", "method"))
    assert tuple(option.type.choices)[: len(METHOD_NAMES)] == METHOD_NAMES
    result = invoke(runner, *command, "--help")
    assert result.exit_code == 0
    for name in METHOD_NAMES:
        assert name in result.output


def test_docs_describe_every_attribution_method():
    import captum.attr

    import explain.attribution as attribution
    import explain.spec as spec

    for name, cls in ATTRIBUTION_METHODS.items():
        assert f"``{name}``" in attribution.__doc__, f"explain.attribution does not document {name}"
        assert hasattr(captum.attr, cls)
    for field in ("samples", "segments", "segmentation", "steps", "window", "stride"):
        assert field in spec.AttributionSettings.__dataclass_fields__
        assert field in (spec.__doc__ + attribution.__doc__ + open(spec.__file__).read())


# --- cbr query and cbr explain over a tiny case base -----------------------------------------

def _rows(db, query_id):
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Explanation

    cb = open_casebase(db)
    with cb.read() as s:
        rows = s.scalars(select(Explanation).where(Explanation.query_id == query_id).order_by(Explanation.id)).all()
        return [(r.id, r.role, r.method, r.target, r.case_id, r.height, r.width, r.data) for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("method, spec", [("lime", "lime(n=30,seg=slic50)"),
                                          ("integrated-gradients", "integrated-gradients(n=30)")])
def test_query_explains_query_and_neighbours_with_similarity(runner, indexed, query_set, tmp_path, method, spec):
    image = query_set.parent / "images" / "P000_s0.png"
    result = invoke(runner, "query", image, "--db", indexed, "-k", "3", "--explain", method, "--explain-budget", "30",
                    "--out", tmp_path / "reports", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    rows = _rows(indexed, answer["query_id"])
    neighbours = [n["case_id"] for n in answer["neighbours"]]
    assert [(r[1], r[3], r[4]) for r in rows] == [("query", "similarity:neighbours", None)] + [
        ("neighbour", "similarity:query", c) for c in neighbours]
    assert {r[2] for r in rows} == {spec}
    assert any(spec in note and "model evaluations" in note for note in answer["notes"])


def test_query_limits_neighbour_maps(runner, indexed, query_set, tmp_path):
    image = query_set.parent / "images" / "P000_s0.png"
    result = invoke(runner, "query", image, "--db", indexed, "-k", "3", "--explain", "occlusion",
                    "--explain-neighbours", "1", "--explain-budget", "16", "--out", tmp_path / "r", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    rows = _rows(indexed, answer["query_id"])
    assert [(r[1], r[4]) for r in rows] == [("query", None), ("neighbour", answer["neighbours"][0]["case_id"])]


def test_explain_appends_and_never_overwrites(runner, indexed, query_set, tmp_path):
    image = query_set.parent / "images" / "P001_s0.png"
    result = invoke(runner, "query", image, "--db", indexed, "-k", "2", "--out", tmp_path / "r", "--json")
    assert result.exit_code == 0, result.output
    qid = json.loads(result.output)["query_id"]
    before = _rows(indexed, qid)
    from cbr.pipeline.settings import QueryConfig

    from cbr.models.similarity_maps import similarity_spec

    query_time = similarity_spec(QueryConfig.explain, QueryConfig.similarity_map)  # "layercam(sim=match)"
    assert {r[2] for r in before} == {query_time}  # the default method (measured: layercam)
    for method in ("deeplift", "deeplift", "lime"):
        result = invoke(runner, "explain", qid, "--method", method, "--explain-budget", "20", "--db", indexed,
                        "--out", tmp_path / "r")
        assert result.exit_code == 0, result.output
        assert f"Query {qid}: added 3 map(s) made with" in result.output
    after = _rows(indexed, qid)
    assert after[: len(before)] == before  # the query-time rows, byte for byte
    added = after[len(before):]
    assert [r[2] for r in added] == ["deeplift"] * 6 + ["lime(n=20,seg=slic50)"] * 3
    assert {r[1] for r in added} == {"query-added", "neighbour-added"}
    report = (tmp_path / "r" / f"query-{qid}" / "report.html").read_text()
    assert "Explanation methods" in report and "lime(n=20,seg=slic50) (added later)" in report
    assert f"{query_time} (at query time)" in report


def test_explain_errors_are_one_line(runner, indexed, tmp_path):
    result = invoke(runner, "explain", "999", "--method", "lime", "--db", indexed)
    assert result.exit_code == 1 and result.output.startswith("Error: no query 999")
    result = invoke(runner, "explain", "1", "--method", "shap", "--db", indexed)
    assert result.exit_code == 2 and "'shap' is not one of" in result.output


# --- the comparison: cbr evaluate --explain a,b,c|all ----------------------------------------

def test_parse_methods():
    from cbr.errors import UnknownNameError
    from cbr.evaluation.comparison import parse_methods

    assert parse_methods("all") == METHOD_NAMES
    assert parse_methods("lime, gradcam,lime") == ("lime", "gradcam")
    assert parse_methods("none") == ()
    with pytest.raises(UnknownNameError, match="unknown explanation method 'shap'"):
        parse_methods("gradcam,shap")


def test_curves_reward_the_planted_patch():
    """Deletion falls faster and insertion rises faster for the patch's map than for a random map."""
    from cbr.evaluation.comparison import curve_figures

    trunk, neck, head = _planted_model()
    model = nn.Sequential(trunk, neck, head)
    x = _planted_image((0.5, 0.3, 0.1), 0)

    def score(batch):
        return model(batch)[:, 0]

    planted = np.zeros((32, 32), dtype=np.float32)
    planted[PATCH] = 1
    noise = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    mapped = curve_figures([score], x[None], [planted])
    chance = curve_figures([score], x[None], [noise])
    assert mapped["deletion_auc"] < chance["deletion_auc"] - 0.3
    assert mapped["insertion_auc"] > chance["insertion_auc"] + 0.3


def test_curve_figures_pool_images_by_their_gaps():
    """An image whose fully deleted version scores about as high as the intact one (gap 1e-3 of the
    other's) made the mean of per-image deletion and insertion AUCs leave [0, 1]; pooled as a ratio
    of sums they stay in it, and the image is counted when its gap is not positive."""
    from cbr.evaluation.comparison import curve_figures

    image = torch.ones(3, 16, 16)

    def region(batch):
        return batch[:, :, 4:12, 4:12].mean(dim=(1, 2, 3))

    def nearly_flat(batch):
        mean = batch.mean(dim=(1, 2, 3))
        return 0.5 + 1e-3 * region(batch) - 0.2 * mean * (1 - mean)

    def rising(batch):
        return 1 - region(batch)

    saliency = np.arange(256, dtype=np.float32).reshape(16, 16)
    images = torch.stack([image, image])
    figures = curve_figures([region, nearly_flat], images, [saliency, saliency])
    for key in ("deletion_auc", "insertion_auc"):
        assert 0 <= figures[key] <= 1, (key, figures[key])
    assert figures["non_positive_gaps"] == 0
    assert curve_figures([region, rising, region], torch.stack([image] * 3), [saliency] * 3)["non_positive_gaps"] == 1


def test_compare_with_a_head_has_both_targets(phantom_set):
    from cbr.data.dataset import read_dataset
    from cbr.evaluation.comparison import compare_explanations, format_comparison
    from cbr.models.embedder import create_embedder

    records = read_dataset(phantom_set).records
    embedder = create_embedder("tinycnn", weights="none", input_size=32, class_names=["cyst", "normal", "tumour"])
    result = compare_explanations(embedder, records, ("gradcam", "occlusion"), images=3, budget=9)
    assert result["targets"] == ["class", "similarity"]
    assert [(r["method"], r["target"]) for r in result["rows"]] == [
        ("random", "class"), ("gradcam", "class"), ("occlusion(w=11,s=11)", "class"),
        ("random", "similarity"), ("gradcam", "similarity"), ("occlusion(w=11,s=11)", "similarity")]
    assert sorted({r.split("_")[0] for r in result["labels"]}) == ["cyst", "normal", "tumour"]
    occlusion = result["rows"][2]
    assert occlusion["evaluations_per_map"] <= 10 and occlusion["seconds_per_map"] > 0
    assert result["maps"][("gradcam", "class")].shape[0] == 3
    table = format_comparison(result)
    assert "pointing" in table  # phantoms have masks
    no_masks = dict(result, masks=0)
    assert "pointing" not in format_comparison(no_masks)
    assert all(isinstance(r["non_positive_gaps"], int) for r in result["rows"])
    flat = dict(result, rows=[dict(r, non_positive_gaps=int(r["target"] == "class")) for r in result["rows"]])
    notes = [line for line in format_comparison(flat).splitlines() if "scored no lower fully deleted" in line]
    assert notes == ["class: 1 of 3 images scored no lower fully deleted; deletion and insertion weigh each image "
                     "by its score's drop"]


@pytest.mark.slow
def test_evaluate_explain_all_prints_the_comparison(runner, indexed, query_set, tmp_path):
    out = tmp_path / "eval"
    result = invoke(runner, "evaluate", query_set, "--db", indexed, "--explain", "all", "--explain-budget", "10",
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert "explanation methods on 3 images" in result.output
    header = next(line for line in result.output.splitlines() if line.startswith("method"))
    assert header.split() == ["method", "target", "pointing", "energy", "deletion", "insertion", "rand.", "rho",
                              "s/map", "evals/map"]
    rows = [line.split()[0] for line in result.output.splitlines() if line.split()[1:2] == ["similarity"]]
    assert [r.split("(")[0] for r in rows] == ["random", *METHOD_NAMES]
    assert (out / "explanations.png").stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["comparison"]["rows"]) == 1 + len(METHOD_NAMES)


def test_evaluate_explain_rejects_unknown_names(runner, indexed, query_set, tmp_path):
    result = invoke(runner, "evaluate", query_set, "--db", indexed, "--explain", "gradcam,shap")
    assert result.exit_code == 2 and "unknown explanation method 'shap'" in result.output


@pytest.mark.slow
def test_cross_validation_compares_on_the_first_fold(runner, phantom_set, tmp_path):
    out = tmp_path / "cv"
    result = invoke(runner, "evaluate", phantom_set, "--folds", "2", "--no-train", "--backbone", "tinycnn",
                    "--weights", "none", "--explain", "gradcam,occlusion", "--explain-budget", "9", "--out", out)
    assert result.exit_code == 0, result.output
    assert "images of fold 1" in result.output
    rows = [line.split()[0] for line in result.output.splitlines() if line.split()[1:2] == ["similarity"]]
    assert rows == ["random", "gradcam", "occlusion(w=22,s=22)"]
    assert (out / "explanations.png").exists()
