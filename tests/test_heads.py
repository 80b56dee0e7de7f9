import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from transferlab.models.heads import HeadSpec, build_head, head_from_sklearn


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_transplanted_head_matches_sklearn(classes, kind):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(120, 16)).astype(np.float32)
    y = np.arange(120) % classes
    x[:, 0] += y * 2.0
    classifier = (MLPClassifier(hidden_layer_sizes=(8, 4), max_iter=2000, random_state=0)
                  if kind == "mlp" else LogisticRegression(max_iter=500))
    estimator = make_pipeline(StandardScaler(), classifier).fit(x, y)
    spec, head = head_from_sklearn(estimator, num_classes=classes)
    with torch.no_grad():
        proba = head(torch.from_numpy(x)).softmax(1).numpy()
    np.testing.assert_allclose(proba, estimator.predict_proba(x), atol=1e-5)
    assert spec.num_classes == classes and spec.hidden == ((8, 4) if kind == "mlp" else ())


def test_head_spec_round_trips():
    spec = HeadSpec(in_features=5, num_classes=3, hidden=(4,), dropout=0.5)
    assert HeadSpec.from_dict(spec.to_dict()) == spec
    assert len(build_head(spec)) == 4  # Linear, ReLU, Dropout, Linear
