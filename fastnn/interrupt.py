"""Ctrl-C during training: finish the current step, then save and stop.

`stop_requests()` is a context manager that yields a `StopRequest` whose
`requested` turns True at the first SIGINT (a second one raises
KeyboardInterrupt at once). Outside the main thread it installs nothing.
"""
import contextlib
import signal
import threading


class StopRequest:
    """Set by the SIGINT handler; the training loop reads it between steps."""
    requested = False


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during train(): the state was saved to `checkpoint` (or None)."""

    def __init__(self, message, checkpoint):
        super().__init__(message)
        self.checkpoint = checkpoint


@contextlib.contextmanager
def stop_requests():
    """While inside, the first Ctrl-C sets the yielded StopRequest; the previous handler returns."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        request.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)
