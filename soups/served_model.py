"""The file MLflow logs as the soup's model code ("models from code": nothing is pickled).
MLflow runs it when the model is loaded; the weights come from the `checkpoint` artifact."""

import mlflow

from soups.tracking import SoupModel

mlflow.models.set_model(SoupModel())
