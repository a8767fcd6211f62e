"""The soup as MLflow serves it, logged as "models from code": MLflow runs this file when it logs
or loads the model, so nothing is pickled; the weights come from the `checkpoint` artifact."""

from pathlib import Path

import mlflow

from soups.models import load_checkpoint
from soups.predict import Predictor


class SoupModel(mlflow.pyfunc.PythonModel):
    """A DataFrame column `image` of base64 image bytes (or an N x H x W x 3 uint8 array) in;
    label, class_name and probability per image out."""

    def load_context(self, context):
        self.predictor = Predictor(load_checkpoint(Path(context.artifacts["checkpoint"])))

    def predict(self, context, model_input, params=None):
        return self.predictor.predict(model_input)


mlflow.models.set_model(SoupModel())
