"""Ctrl-C (or SIGTERM) during training: finish the current step, then save and stop.

`stop_requests()` is a context manager that yields a `StopRequest` whose
`signum` becomes the signal (SIGINT or SIGTERM) at the first one (a second
one raises KeyboardInterrupt at once); the training loop reads it between
steps. Outside the main thread it installs nothing.
"""
import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by the signal handler: `signum` (None until a stop is asked for)."""
    signum = None

    @property
    def requested(self):
        return self.signum is not None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during train(): the state was saved to `checkpoint` (or None).

    `signum` is the signal that stopped it (signal.SIGINT or signal.SIGTERM).
    """

    def __init__(self, message, checkpoint, signum=signal.SIGINT):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.signum = signum


@contextlib.contextmanager
def stop_requests():
    """While inside, the first SIGINT/SIGTERM sets the yielded StopRequest; then the previous
    handlers return."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.requested:  # a second one stops at once
            raise KeyboardInterrupt
        request.signum = signum

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
