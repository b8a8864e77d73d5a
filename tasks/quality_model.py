"""MLflow "model from code" for the fastText quality classifier (self-contained: it is copied into
the logged model, so it must not import herd).

``predict(DataFrame with a "text" column) -> list of P(reference quality)``, normalising text exactly
as herd's quality step does (lowercase, punctuation split, whitespace collapsed, first N chars).
"""

import re

import mlflow
from mlflow.pyfunc import PythonModel

_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"([.,!?;:()\[\]{}\"<>/=])")


class FastTextQualityModel(PythonModel):
    max_chars = 4000

    def load_context(self, context):
        import fasttext

        self.model = fasttext.load_model(context.artifacts["fasttext"])
        self.max_chars = int((context.model_config or {}).get("max_chars", 4000))

    def predict(self, context, model_input, params=None):
        texts = list(model_input["text"]) if hasattr(model_input, "columns") else list(model_input)
        clean = [_WS.sub(" ", _PUNCT.sub(r" \1 ", str(t)[: self.max_chars].lower())).strip() for t in texts]
        labels, probs = self.model.predict(clean, k=-1)
        return [float(dict(zip(lab, pr)).get("__label__hq", 0.0)) for lab, pr in zip(labels, probs)]


mlflow.models.set_model(FastTextQualityModel())
