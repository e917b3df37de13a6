"""A run's global model as MLflow loads it: a "models from code" file, run by MLflow on load.

Why code rather than a ``PythonModel`` instance: MLflow 3.17 cloudpickles an instance into
``python_model.pkl`` and by default refuses to unpickle it on load
(``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``); ``mlflow.pytorch`` pickles the whole module. Given
this file's path instead, MLflow copies the file into the model and runs it on load: nothing is
pickled, the architecture is rebuilt from ``model.json`` and the weights are read from the
model's safetensors artifacts (``autorank.serving``). Loading needs ``autorank`` importable.

``predict(x)``: class predictions ``[n]`` (int64) for samples ``x [n, d]`` (float32, flattened
and normalised as ``autorank.data`` stores them); a text model takes a ``text`` column of raw
strings and predicts label names. ``predict(x, params={"output": "probabilities"})``: class
probabilities ``[n, n_classes]``. A causal LM takes a ``text`` column of prompts and returns
their greedy continuations (``params={"max_new_tokens": 32}``).
"""

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel, PythonModelContext

from autorank.serving import Classifier, Generator, ModelSpec, load_classifier, load_generator


class AutoRankClassifier(PythonModel):
    """The federated run's global model: base + global adapter + head."""

    classifier: Classifier | None = None
    generator: Generator | None = None

    def load_context(self, context: PythonModelContext) -> None:
        """Rebuild the model from the artifacts ``spec``, ``base`` and ``adapter``."""
        files = {name: Path(path) for name, path in context.artifacts.items()}
        spec, base, adapter = files["spec"], files.get("base"), files["adapter"]
        if ModelSpec.from_json(spec.read_text()).name == "causal_lm":
            self.generator = load_generator(spec, base, adapter)
        else:
            self.classifier = load_classifier(spec, base, adapter)

    def predict(
        self,
        context: PythonModelContext,
        model_input: np.ndarray,  # MLflow validates no input by this hint; the signature does
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        """Classes ``[n]``, or probabilities ``[n, n_classes]`` with ``output=probabilities``;
        a causal LM's continuations ``[n]`` of its prompts."""
        if self.generator is not None:
            n = int((params or {}).get("max_new_tokens", 32))
            return np.asarray(self.generator.predict(model_input, max_new_tokens=n), dtype=object)
        if self.classifier is None:
            raise RuntimeError("the model is not loaded: MLflow calls load_context first")
        output = str((params or {}).get("output", "class"))
        text = self.classifier.encoder is not None  # a table of raw strings
        x = model_input if text else np.asarray(model_input)
        return self.classifier.predict(x, output=output)


mlflow.models.set_model(AutoRankClassifier())
