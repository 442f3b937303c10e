"""Target callables in grad-cam's style: parameters in __init__, a score from __call__.

Each receives one sample's head output (a 1-D tensor) or, like grad-cam's
ClassifierOutputTarget, a 2-D batch, for which it returns one score per row.
"""

import numpy as np


class ClassTarget:
    """The logit of class `index` (the head output is class logits)."""

    def __init__(self, index):
        self.index = int(index)

    def __call__(self, output):
        return output[..., self.index]

    def __repr__(self):
        return f"ClassTarget({self.index})"


class SimilarityTarget:
    """Cosine between the (un-normalised) embedding and a constant reference vector.

    The score is normalize(output) . normalize(reference); the reference carries no gradient,
    so the map shows what in this image makes it resemble the reference case.
    """

    def __init__(self, reference):
        import torch
        import torch.nn.functional as F

        if isinstance(reference, torch.Tensor):
            reference = reference.detach().to("cpu", torch.float32)
        else:
            reference = torch.as_tensor(np.asarray(reference, dtype=np.float32))
        if reference.ndim != 1:
            raise ValueError(f"reference must be a 1-D vector, got shape {tuple(reference.shape)}")
        self.reference = F.normalize(reference, dim=0)

    def __call__(self, output):
        import torch.nn.functional as F

        reference = self.reference.to(device=output.device, dtype=output.dtype)
        return (F.normalize(output, dim=-1) * reference).sum(dim=-1)

    def __repr__(self):
        return f"SimilarityTarget(<{self.reference.numel()}-d reference>)"


class EmbeddingNormTarget:
    """The L2 norm of the embedding: a class-agnostic "what is this embedding made of" target.

    Its gradient w.r.t. the pooled embedding is the embedding's own direction.
    """

    def __call__(self, output):
        import torch

        return torch.linalg.vector_norm(output, dim=-1)

    def __repr__(self):
        return "EmbeddingNormTarget()"
