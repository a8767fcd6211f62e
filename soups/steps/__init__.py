"""The pipeline's steps, in the order a user runs them: each turns a recipe and its options into
runs on the tracking server, over the library below (`soups.data`, `soups.models`, `soups.train`,
`soups.evaluate`, `soups.soup`, ...) and `soups.tracking` beside it. Steps never import one
another; where one step drives another (a sweep trains members and soups them), the entry point
hands it the other step as a function.

- `finetune`: the `start` run (shared starting weights) and each sweep member
- `evaluate`: test scores of every ingredient run
- `soup/`: rank, cook, report and register a soup (`step`, `ingredients`, `report`, `publish`)
- `infer`: predictions of the champion (and an ensemble beside it)
- `sweep/`: an Optuna study whose trials are ingredient runs (`step`, `study`), and the soups that
  follow it (`souping`)
"""
