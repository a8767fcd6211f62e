"""The MLflow contract (../DESIGN.md): the one package that knows MLflow's API and every name the
steps share (params, metrics, tags, artifact paths). Nothing else in soups imports mlflow.

- `names`: every tag, param, metric and artifact name, defined once
- `server`: which server, whether it answers, one-line errors, safe search literals
- `liveness`: a training run's heartbeat, and telling a live run from a dead one
- `lifecycle`: experiments (ensured), a run's start, name, description and end
- `runs`: one run and what the steps log into it
- `search`: finding and reading runs (never changes one)
- `checkpoints`: a run's or model's checkpoint as a checked local file
- `sweeps`: a sweep's parent run, its setup, best trial and plots
- `resume`: a run's training state kept and the run reopened in place
- `start_claims`: `start: auto` as find or make, one start however many processes arrive at once
- `soup_history`: the earlier soup a soup step continues, its runs and scores
- `registry`: registering a soup with its lineage, its signature and requirements
- `promotion`: the `champion` alias read, and promotions that take turns
- `served_model`: the soup as `mlflow models serve` runs it
"""

from soups.tracking.checkpoints import (  # noqa: F401
    cache_root,
    cached_checkpoint,
    checkpoint_for,
    is_mlflow_uri,
)
from soups.tracking.lifecycle import (  # noqa: F401
    abandon,
    describe_experiment,
    ensure_experiment,
    flag_project_run,
    generated_name,
    heartbeat,
    start,
    start_step,
    step_experiment,
    take_project_run,
)
from soups.tracking.names import *  # noqa: F403  (every name, as tracking.NAME)
from soups.tracking.promotion import Rival, champion, promote  # noqa: F401
from soups.tracking.registry import Lineage, model_version, register  # noqa: F401
from soups.tracking.resume import keep_training_state, resumable, training_state  # noqa: F401
from soups.tracking.runs import (  # noqa: F401
    DataPart,
    Run,
    log_scores,
)
from soups.tracking.search import (  # noqa: F401
    classes_of,
    experiment_name,
    experiment_of_run,
    experiment_or_own,
    find_experiment,
    get_run,
    has_score,
    ingredient_filter,
    member_of,
    model_of,
    parent_filter,
    pretrained_of,
    rank_score,
    ranked_ingredients,
    role_of,
    run_of,
    run_params,
    soup_metrics,
    split_filter,
    split_of,
    start_of,
    start_run_of,
    test_score,
    val_accuracy_of,
)
from soups.tracking.server import (  # noqa: F401
    QUIET_DEFAULTS,
    RUN_ID,
    Unreachable,
    check_access,
    checked_run_id,
    configure,
    create_store,
    default_tracking_uri,
    has_password,
    is_unreachable,
    quote,
    raising_unreachable,
    without_password,
)
from soups.tracking.soup_history import Earlier, earlier_soup  # noqa: F401
from soups.tracking.start_claims import (  # noqa: F401
    StartAction,
    TakenOver,
    check_still_claimed,
    finished_start,
    next_start_action,
    start_key,
)
from soups.tracking.sweeps import (  # noqa: F401
    log_sweep_best,
    log_sweep_plot,
    log_sweep_setup,
    mark_sweep_worker,
    sweep_parent,
)
