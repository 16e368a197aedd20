"""Which worker trains which trial of a study: slots, heartbeats, lost trials run again."""
import threading
import time
import warnings

from fastnn import models
from fastnn.tune.optuna_api import (RETRY_HISTORY, storage_id, study_storage,
                                        trial_handle)
from fastnn.tune.storage import MAX_RETRIES, StorageUnavailable, storage_errors
from fastnn.tune.study import has_result, pinned, trial_key


class Worker:
    """This process's share of a study: takes trials, keeps them alive, finds lost ones.

    Optuna records heartbeats only inside `Study.optimize`; tune trains a
    stack of trials at once, so a thread of its own records one every
    `heartbeat_seconds` for each trial this worker trains. `--trials N` counts
    trials with a result: a trial's "slot" is the number of the trial it runs
    (a retry keeps its lost trial's), and a new trial runs only when fewer
    than N slots with smaller numbers exist, which every worker decides alike.
    """

    def __init__(self, study, options, log):
        self.study, self.log = study, log
        self.storage = study_storage(study)  # trials made through it are in the study's view
        self.study_id = self.storage.get_study_id_from_name(study.study_name)
        self.trials = options["trials"]
        # what the trials of one stack share (a queued trial brings its values)
        self.shared = tuple(models.MODELS[options.get("model", models.DEFAULT_TUNE_MODEL)]
                            .search.shared)
        self.worker = options["worker"]
        interval = getattr(self.storage, "get_heartbeat_interval", lambda: None)()
        self.heartbeats = interval is not None  # database storages; a journal keeps none
        self.interval, self.grace = options["heartbeat_seconds"], options["grace_seconds"]
        self.held = {}  # trial id -> number, for the trials this worker trains
        self.first_seen = {}  # others' RUNNING trial number -> time.monotonic() first seen
        self.lost_since = {}  # lost trial's number -> when first seen with no retry queued
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.stop = None  # the StopRequest of tune()'s signals, checked before training

    def __enter__(self):
        if self.heartbeats:
            self._thread = threading.Thread(target=self._beat, daemon=True,
                                            name="fastnn-heartbeat")
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, traceback):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc_type is not None and not issubclass(exc_type, StorageUnavailable):
            self.hand_back_all()  # stopped or broken: at once, not after the grace period

    def hand_back_all(self):
        """Hand back every trial this worker trains (it stops); says so where it cannot."""
        for trial_id in list(self.held):
            try:
                self.hand_back(trial_id)
            except storage_errors() as error:
                numbers = ", ".join(str(n) for n in sorted(self.held.values()))
                self.log(f"could not hand back trial(s) {numbers} ({' '.join(str(error).split())})"
                         f"; other workers run them again after {self.grace} s without a "
                         "heartbeat")
                return

    def _beat(self):
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self.held)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except storage_errors() as error:  # the next beat tries again
                    self.log(f"heartbeat of trial {self.held.get(trial_id)} failed: {error}")

    def _hold(self, trial_id):
        if self.heartbeats:  # at once: a trial with no heartbeat is never found stale
            self.storage.record_heartbeat(trial_id)
        trial = trial_handle(self.study, trial_id)
        with self._lock:
            self.held[trial_id] = trial.number
        trial.set_user_attr("worker", self.worker)
        return trial

    def progress(self, trials=None):
        """(trials with a result, slots taken, slots still in flight) of the study now."""
        from optuna.trial import TrialState

        if trials is None:
            trials = self.study.get_trials(deepcopy=False)
        latest = {}  # slot -> its newest trial (a retry supersedes the lost one)
        for trial in trials:
            if trial.state == TrialState.FAIL and "skipped" in trial.user_attrs:
                continue
            slot = trial_key(trial)
            if slot not in latest or trial.number > latest[slot].number:
                latest[slot] = trial
        now = time.monotonic()
        results, slots, in_flight = 0, set(), 0
        for slot, trial in latest.items():
            if has_result(trial):
                results += 1
            elif trial.state == TrialState.FAIL:  # lost, and no retry queued (yet)
                retries = len(trial.system_attrs.get(RETRY_HISTORY, []))
                since = self.lost_since.setdefault(trial.number, now)
                if retries >= MAX_RETRIES or now - since > 2 * self.grace:
                    continue  # given up, or its finder died before queueing it: a new trial's slot
                in_flight += 1
            else:
                in_flight += 1
            slots.add(slot)
        return results, slots, in_flight

    def recover(self):
        """Mark FAIL, and queue again, the trials whose workers stopped sending heartbeats."""
        import optuna
        from optuna.trial import TrialState

        if not self.heartbeats:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        # A trial with no heartbeat at all (its worker died within a moment of taking it, or
        # an older fastnn ran it) is never stale to Optuna: after it has run a grace period
        # as seen from here, it gets one heartbeat, so that its owner's silence shows.
        now = time.monotonic()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if storage_id(trial) in self.held:
                continue
            seen = self.first_seen.setdefault(trial.number, now)
            if seen is not None and now - seen > self.grace:
                self.first_seen[trial.number] = None
                self.storage.record_heartbeat(storage_id(trial))

    def hand_back(self, trial_id):
        """Mark a trial FAIL and queue it again, as a worker that finds it lost does."""
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        with self._lock:
            self.held.pop(trial_id, None)
        callback = getattr(self.storage, "get_heartbeat_stale_trial_callback", lambda: None)()
        try:
            if not self.storage.set_trial_state_values(trial_id, TrialState.FAIL):
                return
        except UpdateFinishedTrialError:
            return
        if callback is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                callback(self.study, self.storage.get_trial(trial_id))

    def reclaim_running(self):
        """Queue again what a killed session left RUNNING (a study in this worker's own folder)."""
        from optuna.trial import TrialState

        for trial in self.study.get_trials(states=(TrialState.RUNNING,)):
            self.hand_back(storage_id(trial))

    def take(self, k):
        """Up to k trials for one stack, as [(trial, slot)]; [] when the study has none to give.

        Queued trials come first (retries of lost ones, the baseline), only
        those of one structure, since a stack shares its structure; then new
        trials while the study has room.
        """
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        self.recover()
        trials = self.study.get_trials(deepcopy=False)
        taken, structure = [], None
        for queued in trials:
            if queued.state != TrialState.WAITING or len(taken) == k:
                continue
            values = pinned(queued, self.shared)
            if taken and (None in structure or values != structure):
                continue
            try:  # atomic: of the workers that try, one gets it
                claimed = self.storage.set_trial_state_values(storage_id(queued),
                                                              TrialState.RUNNING)
            except UpdateFinishedTrialError:
                claimed = False
            if claimed:
                taken.append((self._hold(storage_id(queued)), trial_key(queued)))
                structure = values
        _, slots, _ = self.progress(trials)
        new = [self._hold(self.storage.create_new_trial(self.study_id))
               for _ in range(min(k - len(taken), self.trials - len(slots)))]
        if new:
            # Another worker may have taken the last slots since `trials` was read: numbers
            # are handed out in order, so the N smallest slots are the study's.
            _, slots, _ = self.progress()
            for trial in new:
                if sum(slot < trial.number for slot in slots) < self.trials:
                    taken.append((trial, trial.number))
                else:
                    trial.set_user_attr("skipped", "the study had --trials slots taken before it")
                    self.finish(trial, state=TrialState.FAIL)
        return taken

    def finish(self, trial, value=None, state=None, failed=None):
        """Tell Optuna the trial's end; False when another worker declared it lost meanwhile.

        `failed` (a reason) marks a trial that failed by itself: a result, not run again.
        """
        from optuna.exceptions import UpdateFinishedTrialError

        with self._lock:
            self.held.pop(storage_id(trial), None)
        try:
            if failed:
                trial.set_user_attr("failed", failed)
            self.study.tell(trial, value, state=state)
            return True
        except UpdateFinishedTrialError:
            self.log(f"trial {trial.number}: dropped, another worker found it lost (no heartbeat "
                     f"for {self.grace} s) and runs it again")
            return False
