"""Ctrl-C (SIGINT) and SIGTERM as a request the training loop honours at the next step boundary."""
import contextlib
import signal
import threading


class StopFlag:
    """SIGINT / SIGTERM set `requested`; a second SIGINT interrupts as usual. The handlers found
    before are restored afterwards, whatever they were (ignored, in a background job)."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
