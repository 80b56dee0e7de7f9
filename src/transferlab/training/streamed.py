"""Logistic regression on more embeddings than fit in memory: extract's classifier for large sets.

scikit-learn's LogisticRegression (lbfgs) needs every training embedding in one array, plus a
standardised copy: about 2.4 GB for 200,000 images of EfficientNet-Lite0 (1,280 features) before
the validation and test embeddings. Here the same model is fitted with the embeddings read in
chunks: a StandardScaler by partial_fit, then the same objective (cross-entropy summed over the
images, plus half the squared L2 norm of the weights, C = 1; the intercept is not penalised;
a binary problem has one logit) minimised by torch's L-BFGS, each evaluation one pass over the
chunks. The result quacks like the Pipeline(StandardScaler, LogisticRegression) it stands in for,
so models.heads.head_from_sklearn transplants it unchanged.

The chunks come from a RowFile: float32 rows in an anonymous temporary file, read back with plain
reads. Not a memory map: its pages would count as the process's memory once touched.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

CHUNK_ROWS = 8192  # 40 MB of Lite0 embeddings: large matrix products, small memory
MAX_ITERATIONS = 300  # L-BFGS steps; sklearn's lbfgs stops at a gradient norm of 1e-4, as here
GRADIENT_TOLERANCE = 1e-4


class RowFile:
    """float32 rows of one width, written once in chunks and read back in chunks any number of
    times; only one chunk is in memory at a time."""

    def __init__(self, chunks: Iterable[np.ndarray]):
        self.file = tempfile.TemporaryFile()  # removed when closed, also when the process dies
        self.rows, self.width = 0, None
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=np.float32).reshape(len(chunk), -1)
            self.width = chunk.shape[1]
            chunk.tofile(self.file)
            self.rows += len(chunk)

    def chunks(self, rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        self.file.seek(0)
        for start in range(0, self.rows, rows):
            yield np.fromfile(self.file, dtype=np.float32, count=min(rows, self.rows - start)
                              * self.width).reshape(-1, self.width)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "RowFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    """(StandardScaler, StreamedLogistic) fitted on `rows` (one per label), in chunks."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    for chunk in rows.chunks():
        scaler.partial_fit(chunk)
    classes, targets = np.unique(labels, return_inverse=True)
    outputs = 1 if len(classes) == 2 else len(classes)
    linear = nn.Linear(rows.width, outputs, dtype=torch.float64)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    mean, scale = (torch.as_tensor(v, dtype=torch.float64) for v in (scaler.mean_, scaler.scale_))
    targets = torch.as_tensor(targets)
    count = len(targets)
    evaluations, started = [0], time.perf_counter()

    def objective() -> torch.Tensor:
        """The mean loss over all rows plus the penalty, its gradient accumulated chunk by chunk."""
        linear.zero_grad()
        total, start = 0.0, 0
        for chunk in rows.chunks():
            inputs = (torch.from_numpy(chunk).to(torch.float64) - mean) / scale
            wanted = targets[start:start + len(chunk)]
            start += len(chunk)
            logits = linear(inputs)
            loss = (nn.functional.binary_cross_entropy_with_logits(logits[:, 0], wanted.double(),
                                                                    reduction="sum")
                    if outputs == 1 else nn.functional.cross_entropy(logits, wanted, reduction="sum"))
            (loss / count).backward()
            total += float(loss.detach())
        penalty = linear.weight.pow(2).sum() / (2 * inverse_regularization * count)
        penalty.backward()
        evaluations[0] += 1
        if evaluations[0] % 25 == 0:  # a long fit is never silent for minutes
            log.info("streamed logistic regression: %d passes over %d embeddings (%.0f s)",
                     evaluations[0], count, time.perf_counter() - started)
        return torch.tensor(total / count, dtype=torch.float64) + penalty.detach()

    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=MAX_ITERATIONS,
                                  tolerance_grad=GRADIENT_TOLERANCE, tolerance_change=1e-10,
                                  history_size=10, line_search_fn="strong_wolfe")
    optimizer.step(objective)
    iterations = optimizer.state[optimizer.param_groups[0]["params"][0]]["n_iter"]
    log.info("streamed logistic regression: %d iterations, %d passes over %d embeddings (%.0f s)",
             iterations, evaluations[0], count, time.perf_counter() - started)
    coef, intercept = linear.weight.detach().numpy(), linear.bias.detach().numpy()
    return scaler, StreamedLogistic(classes, coef, intercept)
