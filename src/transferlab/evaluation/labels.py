"""Label issues: images whose given label the rest of the data set disagrees with.

Two steps, after Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset
Labels" (JAIR 2021), written here from the paper (cleanlab, its reference code, is AGPL and never a
dependency):
1. out-of-fold probabilities: logistic regression on the frozen backbone's embeddings, K-fold
   cross-validated, stratified by label, with every duplicate group inside one fold (a copy in the
   training folds would vouch for its own label);
2. confident learning, pruning by noise rate: class j's threshold t_j is the mean probability of j
   over the images labelled j (its average self-confidence). The confident joint C[i, j] counts the
   images labelled i whose confident class is j: the most probable of the classes k with p_k >= t_k
   (an image where no class reaches its threshold is not counted). Each row of C is scaled to the
   number of images labelled i, which estimates E[i, j], how many images labelled i are of class j.
   For each i != j, the E[i, j] images labelled i with the largest margin p_j - p_i are suspects,
   with j as the suggested label (the most probable such j when an image is picked for several).
   Suspects are ranked by that margin, most suspicious first.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import DataError

# Much stronger regularisation than scikit-learn's default (C=1), so that the classifier cannot fit
# the wrong labels it is asked to find; it also converges in a fraction of the time. Checked on two
# sets with 5% and 10% of the labels flipped (benchmarks/bench_trust.py, F1 of the flips found):
# face-mask (2 classes, 4,094 images) prefers C <= 0.002 (C = 0.05 flags ~30% correct labels),
# flowers-12 (12 classes, 960 images) prefers larger C (best at 0.05), flat within noise 0.002-0.01;
# 0.002 has the best mean F1 over the four (0.889; 0.874 at 0.001 and 0.01, 0.837 at 0.05).
REGULARISATION_C = 0.002
MAX_ITER = 1000


@dataclass
class LabelIssue:
    index: int  # the image's position in the audited arrays
    given: int
    suggested: int
    given_probability: float
    suggested_probability: float
    score: float  # p(suggested) - p(given): higher is more suspicious


@dataclass
class LabelIssues:
    issues: list[LabelIssue]  # most suspicious first
    thresholds: list[float]  # t_j per class (1.0 for a class without images: nothing reaches it)


def out_of_fold_probabilities(embeddings: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                              num_classes: int, folds: int = 5, seed: int = 0
                              ) -> tuple[np.ndarray, int]:
    """(images, num_classes) probabilities, each from a model that never saw the image or any of its
    duplicates, and the number of folds used (fewer than asked when there are fewer groups)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    present = np.unique(labels)
    folds = min(folds, len(np.unique(groups)))
    if len(present) < 2 or folds < 2:
        raise DataError(f"the label audit needs two classes and two groups of images to cross-validate; "
                        f"found {len(present)} class(es) in {len(np.unique(groups))} group(s)")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=REGULARISATION_C, max_iter=MAX_ITER))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # small classes: "The least populated class in y has only N members" is expected here
        warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="sklearn")
        proba = cross_val_predict(model, embeddings, labels, groups=groups, cv=splitter,
                                  method="predict_proba")
    full = np.zeros((len(labels), num_classes))
    full[:, present] = proba  # columns of the classes present, in sorted order
    return full, folds


def find_label_issues(proba: np.ndarray, labels: np.ndarray) -> LabelIssues:
    """Confident learning on out-of-fold probabilities, pruning by noise rate (see the module's
    docstring)."""
    labels = np.asarray(labels)
    thresholds = class_thresholds(proba, labels)
    errors = estimated_errors(confident_joint(proba, labels, thresholds), labels)
    suggested: dict[int, int] = {}
    for i, j in zip(*np.nonzero(errors)):
        members = np.flatnonzero(labels == i)
        margin = proba[members, j] - proba[members, i]
        for m in members[np.argsort(-margin, kind="stable")[:errors[i, j]]]:
            if m not in suggested or proba[m, j] > proba[m, suggested[m]]:
                suggested[int(m)] = int(j)
    issues = [LabelIssue(m, int(labels[m]), j, float(proba[m, labels[m]]), float(proba[m, j]),
                         float(proba[m, j] - proba[m, labels[m]])) for m, j in suggested.items()]
    issues.sort(key=lambda issue: (-issue.score, issue.index))
    return LabelIssues(issues, [float(t) for t in thresholds])


def class_thresholds(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """t_j: the mean probability of j over the images labelled j (1.0 for a class without images:
    nothing reaches it)."""
    return np.array([proba[labels == j, j].mean() if np.any(labels == j) else 1.0
                     for j in range(proba.shape[1])])


def confident_joint(proba: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """C[i, j]: the images labelled i whose confident class is j, the most probable of the classes
    that reach their own threshold (an image where none does is not counted)."""
    num_classes = proba.shape[1]
    above = proba >= thresholds[None, :]
    confident = np.argmax(np.where(above, proba, -1.0), axis=1)
    counted = above.any(1)
    joint = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(joint, (labels[counted], confident[counted]), 1)
    return joint


def estimated_errors(joint: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """E[i, j] for i != j (0 on the diagonal): how many images labelled i are of class j, each row
    of the confident joint scaled to the number of images labelled i (the paper's calibration) and
    rounded."""
    counts = np.bincount(labels, minlength=len(joint))
    rows = joint.sum(1, keepdims=True)
    calibrated = np.divide(joint * counts[:, None], rows, out=np.zeros(joint.shape), where=rows > 0)
    errors = np.rint(calibrated).astype(int)
    np.fill_diagonal(errors, 0)
    return errors
