"""The executor interface for a study run in this process: a study with one worker needs no process pool."""

from __future__ import annotations

from concurrent.futures import Future


class InProcess:
    """Runs each task at submit, as `ProcessPoolExecutor` would run it later."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, cancel_futures: bool = False) -> None:
        pass
