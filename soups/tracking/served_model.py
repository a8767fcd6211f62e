"""The soup as MLflow serves it, logged as "models from code": MLflow runs this file when it logs
or loads the model, so nothing is pickled; the weights come from the `checkpoint` artifact."""

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from soups import SoupsError
from soups.models import load_checkpoint
from soups.predict import Predictor


class SoupModel(mlflow.pyfunc.PythonModel):
    """A DataFrame column `image` of base64 image bytes in (the logged signature); label,
    class_name and probability per image out. `soups.predict.Predictor` also takes uint8 arrays
    in Python; through MLflow the signature admits the column only."""

    def load_context(self, context):
        self.predictor = Predictor(load_checkpoint(Path(context.artifacts["checkpoint"])))

    # The DataFrame hint: MLflow then neither warns for a missing hint nor infers a schema (the
    # signature logged with the model is the one that holds).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            return self.predictor.predict(model_input)
        except SoupsError as e:  # a bad image: 400 naming the row, not a 500 with a stack trace
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(SoupModel())
