"""Every name soups gives things in MLflow: tags, params, metrics and artifact paths the steps
share. Defined here once; the rest of soups imports them (`tracking.SPLIT`), never spells them."""

# Tags
ROLE = "soups.role"  # start | ingredient | evaluation | soup | inference | sweep
SPLIT = "soups.split"  # fingerprint of the held-out file lists
START = "soups.start"  # weights_digest of the exact weights a run started from
START_RUN = "soups.start_run"  # the start run those weights came from (absent: the pretrained ones)
SHA256 = "soups.sha256"  # of the checkpoint artifact
START_FOR = "soups.start_for"  # on a start run: "<model> <split>", what it is (claimed to be) the start of
HEARTBEAT = "soups.heartbeat"  # unix time a training run last said its process is alive
HEARTBEAT_EVERY = "soups.heartbeat_every"  # seconds between those beats (a run older than 3 of them is dead)
STOPPED = "soups.stopped"  # why training stopped early (a pruned sweep trial)
STUDY = "soups.study"  # the Optuna study of a sweep and its trials
TRIAL = "optuna_trial"
# Artifacts
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "model.pt"  # what a checkpoint file is called, before and after it is logged
CHECKPOINT = f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}"
RECIPE = "recipe.yaml"
INGREDIENTS = "ingredients.csv"
SOUP_BOOK = "soup_book.json"  # a soup's runs considered and held-out scores, for a soup that continues it
SOUP_CURVE = "soup_curve.png"  # the chosen method's curve (greedy: val accuracy after k candidates)
VAL_VS_TEST = "val_vs_test.png"
SCORES = "scores.csv"
PER_CLASS_ERRORS = "per_class_errors.csv"
PREDICTIONS = "predictions.csv"
SKIPPED = "unreadable_images.csv"
MODEL_NAME = "model"  # the logged MLflow model of a soup run
# Ranking metric and the per-epoch metrics of an ingredient run (step = epoch)
RANK_METRIC = "val_accuracy"
SOUP_STEP_METRIC = "soup_val_accuracy"  # the chosen method's curve: greedy, step k = after k candidates
CHAMPION = "champion"
CHAMPION_WHY = "soups.champion_because"  # on a model version: why the alias moved to it
PROMOTION = (
    "soups.promotion"  # on a model version: PENDING until compared with the champion, then the outcome
)
PENDING = "pending"
PROMOTION_BEAT = "soups.promotion_beat"  # a counter a pending version's step bumps while it waits and decides
NOTE = "mlflow.note.content"  # a run's, a model version's or an experiment's Markdown description
EXPERIMENT_KIND = "mlflow.experimentKind"  # the UI opens an experiment in its model-training view
MAX_NOTE_LENGTH = 8000  # MLflow keeps tag values up to this many characters

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
MAX_PARAM_LENGTH = 6000


def run_link(run_id: str, experiment_id: str, label: str = "") -> str:
    """A Markdown link to a run's page, as the UI resolves it from a description."""
    return f"[{label or run_id[:8]}](#/experiments/{experiment_id}/runs/{run_id})"


def confusion_figure(run_id: str) -> str:
    return f"confusion/{run_id}.png"


def gallery_figure(run_id: str) -> str:
    return f"mistakes/{run_id}.png"


# On a registered model version: where the soup came from (registry.Lineage)
SOUP_RUN = "soups.soup_run"
METHOD = "soups.method"
INGREDIENT_RUNS = "soups.ingredients"
CONSIDERED_RUNS = "soups.considered"  # every candidate run the soup looked at, in rank order
NEW_RUNS = "soups.new_runs"  # those the soup it continued had not considered (all, when it started over)
CONTINUED_FROM = "soups.continued_from"  # also on the soup run: the soup run it continued ("" none)
TEST_METRIC = "test_accuracy"
# Marks on runs that are not ingredients
SWEEP_PARENT = "soups.sweep_parent"  # on another worker's own `mlflow run` run
HOLDS_SECRET = "soups.holds_secret"  # a run whose `-P` params held a password
BEST_TRIAL_RUN = "best_trial_run_id"  # on a sweep's parent run
BEST_PARAM_PREFIX = "best."  # on a sweep's parent run: the best trial's sampled values
OPTUNA_PLOTS = "optuna"  # folder of a sweep's Optuna plots
START_PARAM = "start"  # the recipe field a sweep resolves once for all its trials
# Resume: a run's latest full training state, and the `mlflow run` run that resumed another one
TRAINING_STATE = "state/training_state.pt"
STATE_EPOCH = "soups.state_epoch"  # the epoch TRAINING_STATE ends
RESUMED = "soups.resumed"  # on a `mlflow run` run that continued another run in place
RESUME_CLAIM = "soups.resume_claim"  # host:pid:token of the process that reopened the run last
# Params every ingredient run carries that other steps read back (recipe fields and data sizes)
MEMBER_PARAM = "i"
MODEL_PARAM = "model"
PRETRAINED_PARAM = "pretrained"
CLASSES_PARAM = "num_classes"
