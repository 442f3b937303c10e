"""What training optimises (``OBJECTIVES``): cross-entropy, supervised contrastive (SupCon), or both.

A case-based answer is only as good as its neighbours, and the neighbours are found by cosine on
the L2-normalised embedding (``Embedder.features``: ``normalize(neck(trunk(x)))``), the vector
``cbr index`` stores. Cross-entropy shapes that space only as a by-product of the classifier;
SupCon (Khosla et al., 2020, "Supervised Contrastive Learning", eq. 2, L_out) optimises it
directly: every image is pulled towards the other images of its class in the batch and pushed
from the rest.

* ``ce``: class-weighted cross-entropy on the head's logits (with label smoothing), as before.
* ``supcon``: SupCon on the stored embedding. The head still learns, as a linear probe on the
  *detached* features (its cross-entropy sends no gradient into the backbone), so validation
  balanced accuracy, early stopping and the softmax baseline of ``cbr evaluate`` keep a working
  classifier without letting cross-entropy shape the embedding.
* ``ce+supcon``: cross-entropy (backbone included) plus SupCon, with equal weight (``SUPCON_WEIGHT``).

SupCon needs two images of a class in the batch: an anchor without a positive is left out of the
mean, and a batch where no image has one gives a loss of exactly 0 that is still part of the graph
(``backward`` works and leaves zero gradients).

With ``--mask-guidance`` the guided forward pass gives the logits (``logits=``); the SupCon
objectives then take a second forward pass for the embedding.

The paper puts SupCon on a projection head it throws away afterwards; here the loss is on the
embedding itself, because that embedding is what retrieval uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from cbr.errors import UnknownNameError

__all__ = ["OBJECTIVES", "TEMPERATURE", "SUPCON_WEIGHT", "LossSettings", "get_objective", "supcon_loss"]

# Khosla et al. report 0.1 as their best temperature: lower ones weigh the hardest negatives more
# but train less stably, higher ones separate classes less. It is also the scale at which the
# weighted vote reads these similarities (its fitted temperature is 0.04-0.07 on brain MRI), so the
# loss spreads the neighbours' similarities where the vote is sensitive to them.
TEMPERATURE = 0.1
# Equal weight: both terms start near a logarithm (cross-entropy log K, SupCon log(batch - 1) with
# random embeddings), so neither swamps the other; a weight tuned per dataset is what the issue rules out.
SUPCON_WEIGHT = 1.0


@dataclass(frozen=True)
class LossSettings:
    """What a loss needs besides the model and the batch."""

    class_weight: object = None  # a (K,) float tensor for cross-entropy, or None (unweighted)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    temperature: float = TEMPERATURE  # SupCon's temperature


def supcon_loss(embeddings, labels, temperature: float = TEMPERATURE):
    """SupCon's L_out on L2-normalised ``embeddings`` (B, D) with integer ``labels`` (B,).

    For each anchor i with at least one positive (another image of its class):
    ``-1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p/t) / sum_{a != i} exp(z_i.z_a/t))``; the loss
    is the mean over those anchors, and 0 (still differentiable) when there are none.
    """
    import torch

    z = embeddings.float()
    n = z.shape[0]
    logits = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    # the anchor itself is in neither the numerator nor the denominator
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels.view(-1, 1) == labels.view(1, -1)) & ~self_mask
    n_pos = positive.sum(1)
    anchors = n_pos > 0
    if not bool(anchors.any()):
        return z.sum() * 0.0
    # masked_fill, not multiplication: log_prob is -inf on the diagonal and 0 * -inf is NaN
    per_anchor = log_prob.masked_fill(~positive, 0.0).sum(1)[anchors] / n_pos[anchors]
    return -per_anchor.mean()


def _cross_entropy(logits, y, settings: LossSettings):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), y, weight=settings.class_weight, label_smoothing=settings.label_smoothing)


def _ce(model, x, y, settings: LossSettings, logits=None):
    return _cross_entropy(model.logits(x) if logits is None else logits, y, settings)


def _outputs(model, x):
    """(un-normalised embedding for the head, the normalised embedding cbr stores) from one trunk pass.

    The neck (a pooling) runs twice: cheap, and the second vector is exactly ``Embedder.features``'s.
    """
    acts, emb = model.features(x)
    return model.neck(acts), emb


def _supcon(model, x, y, settings: LossSettings, logits=None):
    z, emb = _outputs(model, x)
    probe = _cross_entropy(model.head(z.detach()), y, settings) if model.head is not None else 0.0
    return supcon_loss(emb, y, settings.temperature) + probe


def _ce_supcon(model, x, y, settings: LossSettings, logits=None):
    z, emb = _outputs(model, x)
    ce = _cross_entropy(model.head(z) if logits is None else logits, y, settings)
    return ce + SUPCON_WEIGHT * supcon_loss(emb, y, settings.temperature)


# name -> loss(model, normalised image batch, label indices, LossSettings, logits=None) -> scalar tensor.
# ``logits``: the batch's logits when another step already computed them (mask guidance's forward
# pass); cross-entropy then uses them. SupCon always takes its own forward pass for the embedding,
# and ``supcon``'s probe ignores them, since its cross-entropy must not reach the backbone.
OBJECTIVES = {"ce": _ce, "supcon": _supcon, "ce+supcon": _ce_supcon}


def get_objective(name: str):
    """The loss function registered as ``name``; UnknownNameError lists the choices."""
    if name not in OBJECTIVES:
        raise UnknownNameError("objective", name, OBJECTIVES)
    return OBJECTIVES[name]
