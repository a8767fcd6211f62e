"""The sweep step: `step` runs this worker's share of an Optuna study (`study`: storage, claims,
heartbeats) as ingredient runs under one parent run; `souping` soups the trials as they finish."""
