"""Logistic regression on more embeddings than fit in memory: extract's classifier for large sets.

scikit-learn's LogisticRegression (lbfgs) needs every training embedding in one array, plus a
standardised copy: about 2.4 GB for 200,000 images of EfficientNet-Lite0 (1,280 features) before
the validation and test embeddings. Here the same model is fitted with the embeddings read in
chunks: a StandardScaler by partial_fit, then the same objective (cross-entropy summed over the
images, plus half the squared L2 norm of the weights, C = 1; the intercept is not penalised;
a binary problem has one logit) minimised by torch's L-BFGS, each evaluation one pass over the
chunks, with the gradient computed directly rather than by autograd. The result quacks like the
Pipeline(StandardScaler, LogisticRegression) it stands in for, so models.heads.head_from_sklearn
transplants it unchanged.

The chunks come from a RowFile (inference/rows.py): float32 rows in an anonymous temporary file.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from ..inference.rows import RowFile

log = logging.getLogger(__name__)

MAX_ITERATIONS = 300  # L-BFGS steps; sklearn's lbfgs stops at a gradient norm of 1e-4, as here
GRADIENT_TOLERANCE = 1e-4


class StreamedLogistic:
    """LogisticRegression's fitted attributes (classes_, coef_, intercept_) and predict_proba, for
    standardised inputs, fitted on a RowFile."""

    def __init__(self, classes: np.ndarray, coef: np.ndarray, intercept: np.ndarray):
        self.classes_, self.coef_, self.intercept_ = classes, coef, intercept

    def decision_function(self, inputs: np.ndarray) -> np.ndarray:
        scores = inputs @ self.coef_.T + self.intercept_
        return scores[:, 0] if len(self.classes_) == 2 else scores

    def predict_proba(self, inputs: np.ndarray) -> np.ndarray:
        scores = torch.as_tensor(self.decision_function(inputs), dtype=torch.float64)
        if len(self.classes_) == 2:
            positive = torch.sigmoid(scores)
            return torch.stack([1 - positive, positive], dim=1).numpy()
        return scores.softmax(dim=1).numpy()


def fit_streamed(rows: RowFile, labels: np.ndarray, inverse_regularization: float = 1.0):
    """(StandardScaler, StreamedLogistic) fitted on `rows` (one per label), in chunks.

    Each pass computes on the float32 rows as read, centred, with the scale folded into the
    weights (standardised x @ W = centred x @ (W / scale)), and the gradient from one float32
    product per chunk: converting every chunk to float64 and standardising it took 3.8 s a pass
    over 200,000 Lite0 embeddings, 257 passes in all. Losses and sums stay in float64."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    for chunk in rows.chunks(reuse=True):
        scaler.partial_fit(chunk)
    classes, targets = np.unique(labels, return_inverse=True)
    outputs = 1 if len(classes) == 2 else len(classes)
    linear = nn.Linear(rows.width, outputs, dtype=torch.float64)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    mean = torch.as_tensor(scaler.mean_, dtype=torch.float32)
    scale = torch.as_tensor(scaler.scale_, dtype=torch.float64)
    targets = torch.as_tensor(targets)
    count = len(targets)
    decay = 1 / (inverse_regularization * count)  # the penalty's weight in the mean loss
    evaluations, started = [0], time.perf_counter()

    def objective() -> torch.Tensor:
        """The mean loss over all rows plus the penalty; its gradient set on the parameters."""
        weight, bias = linear.weight.detach(), linear.bias.detach()
        folded = (weight / scale).float()  # for centred, unscaled rows
        total, weight_sum, bias_sum, start = 0.0, torch.zeros_like(weight), torch.zeros_like(bias), 0
        for chunk in rows.chunks(reuse=True):
            centred = torch.from_numpy(chunk) - mean
            wanted = targets[start:start + len(chunk)]
            start += len(chunk)
            loss, slopes = _loss_and_slopes((centred @ folded.T).double() + bias, wanted)
            total += loss
            weight_sum += (slopes.float().T @ centred).double()
            bias_sum += slopes.sum(dim=0)
        linear.weight.grad = weight_sum / scale / count + weight * decay
        linear.bias.grad = bias_sum / count
        evaluations[0] += 1
        if evaluations[0] % 25 == 0:  # a long fit is never silent for minutes
            log.info("streamed logistic regression: %d passes over %d embeddings (%.0f s)",
                     evaluations[0], count, time.perf_counter() - started)
        return torch.tensor(total / count + float(weight.pow(2).sum()) * decay / 2,
                            dtype=torch.float64)

    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=MAX_ITERATIONS,
                                  tolerance_grad=GRADIENT_TOLERANCE, tolerance_change=1e-10,
                                  history_size=10, line_search_fn="strong_wolfe")
    optimizer.step(objective)
    iterations = optimizer.state[optimizer.param_groups[0]["params"][0]]["n_iter"]
    log.info("streamed logistic regression: %d iterations, %d passes over %d embeddings (%.0f s)",
             iterations, evaluations[0], count, time.perf_counter() - started)
    coef, intercept = linear.weight.detach().numpy(), linear.bias.detach().numpy()
    return scaler, StreamedLogistic(classes, coef, intercept)


def _loss_and_slopes(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The summed cross-entropy of float64 `logits` (one column: binary, the positive class's) and
    its derivative with respect to them."""
    if logits.shape[1] == 1:
        wanted = targets.double()
        loss = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], wanted, reduction="sum")
        return float(loss), (torch.sigmoid(logits[:, 0]) - wanted)[:, None]
    log_proba = logits.log_softmax(dim=1)
    loss = -log_proba.gather(1, targets[:, None]).sum()
    slopes = log_proba.exp()
    slopes[torch.arange(len(targets)), targets] -= 1
    return float(loss), slopes
