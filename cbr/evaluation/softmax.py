"""The softmax baseline: the model's own classifier head on the same test images.

When the (first) model has a classification head, its plain softmax predictions get the same
classification figures as the case-based vote, so the vote can be compared with the classifier
it came from.
"""

from __future__ import annotations

import numpy as np

from cbr.data.batches import iter_batches

__all__ = ["add_softmax", "softmax_predictions"]


def add_softmax(embedder, outcomes, *, batch_size=32, num_workers=None, device="cpu") -> list[str] | None:
    """Fill ``outcome.softmax`` from the model's head; returns the head's classes (None: no head)."""
    import torch

    if embedder is None or embedder.head is None or not outcomes:
        return None
    records = [o.record for o in outcomes]
    embedder.eval()
    for idx, tensors, _bad in iter_batches(records, [embedder.preprocess], batch_size, num_workers,
                                           window=embedder.config.window):
        if not idx:
            continue
        with torch.no_grad():
            proba = torch.softmax(embedder.logits(tensors[0].to(device)).float(), dim=1).cpu().numpy()
        for i, p in zip(idx, proba):
            outcomes[i].softmax = [float(v) for v in p]
    return list(embedder.config.class_names)


def softmax_predictions(outcomes, head_classes, classes):
    """(outcomes with a softmax, predicted labels, probabilities in ``classes`` order, confidences).

    A head class missing from ``classes`` is dropped from the probabilities; a class the head
    does not know scores 0.
    """
    with_softmax = [o for o in outcomes if o.softmax is not None]
    if not head_classes or not with_softmax:
        return [], [], np.zeros((0, len(classes))), []
    col = {c: j for j, c in enumerate(head_classes)}
    full = np.array([o.softmax for o in with_softmax], dtype=np.float64)
    pred = [head_classes[int(i)] for i in full.argmax(axis=1)]
    proba = np.array([[row[col[c]] if c in col else 0.0 for c in classes] for row in full])
    return with_softmax, pred, proba, full.max(axis=1).tolist()
