"""The parts of Optuna that are not its public API and fastnn tune relies on, in one place.

fastnn tune trains trials outside `Study.optimize` (K at once as one stack,
several workers sharing a study), so it does by hand what `optimize` does
inside: it claims queued trials through the study's own storage object, makes
`Trial` handles for the trial ids it claimed, wraps the database calls of
`RDBStorage` to ride out a server restart, and reads the system attributes
that `enqueue_trial` and the heartbeat retry callback write. Any Optuna
release may change these; tests/test_tune.py::test_the_optuna_internals_tune_uses_still_exist
fails when one does.
"""
import logging

FIXED_PARAMS = "fixed_params"    # Study.enqueue_trial: a queued trial's given values
FAILED_TRIAL = "failed_trial"    # RetryHeartbeatStaleTrialCallback: the trial a retry runs again
RETRY_HISTORY = "retry_history"  # ... and the numbers of the lost trials it retries

# The RDBStorage methods that talk to the database (what Optuna's cache calls included);
# the names with a leading underscore are the private ones its public methods call.
DATABASE_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies", "create_new_trial",
    "_create_new_trial", "set_trial_param", "_set_trial_param", "get_trial_param",
    "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial_user_attrs", "get_trial_system_attrs",
    "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "_get_trials",
    "get_best_trial", "_get_best_trial_id", "record_heartbeat", "_get_stale_trial_ids")


# RDBStorage._get_trials logs this warning (on this logger) when a query fails with an
# OperationalError, a database server gone mid-query among them, and then tries another
# query; fastnn's patient storage reports an outage itself, in one line, so the warning
# (a traceback of SQL) is dropped
RDB_LOGGER = "optuna.storages._rdb.storage"
RDB_FALLBACK_WARNING = "Caught an error from sqlalchemy"


class _DropFallbackWarning(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith(RDB_FALLBACK_WARNING)


def quiet_fallback_warnings():
    """Drop RDBStorage's fallback warning (RDB_FALLBACK_WARNING); once per process."""
    logger = logging.getLogger(RDB_LOGGER)
    if not any(isinstance(f, _DropFallbackWarning) for f in logger.filters):
        logger.addFilter(_DropFallbackWarning())


def study_storage(study):
    """The study's own storage object (Optuna wraps a database in a cache), so that trials
    made through it are in the study's view."""
    return study._storage


def trial_handle(study, trial_id):
    """A live optuna.trial.Trial (as `Study.ask` returns) for the trial with storage id
    `trial_id`: it suggests, reports and prunes."""
    import optuna

    return optuna.trial.Trial(study, trial_id)


def storage_id(trial):
    """The storage id of a trial (a FrozenTrial or a live Trial), which the storage's
    methods take (not its number)."""
    return trial._trial_id
