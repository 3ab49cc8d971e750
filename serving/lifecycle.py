"""Process life: a service worker must not outlive the `bentoml serve` that started it.

BentoML's arbiter stops its workers on SIGTERM, but a SIGKILLed arbiter cannot, and its orphans keep the port.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger("bentoml.agegroup")

POLL_S = 1.0  # how often a worker checks that its parent is still there
# The parent as early as this process can see it (this module is imported while the service module loads),
# so a parent killed while the worker was still loading its model is noticed too.
PARENT_AT_IMPORT = os.getppid()


def exit_with_parent(poll_s: float = POLL_S) -> None:
    """Start a daemon thread that sends this process SIGTERM (then SIGKILL) once its parent has gone."""
    parent = PARENT_AT_IMPORT

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning("parent process %d is gone; worker %d exits", parent, os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)  # the worker's own clean shutdown
        time.sleep(3)
        os._exit(1)  # shutdown hung: leave anyway, well inside 5 s

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
