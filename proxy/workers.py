"""`serve --workers N`: N processes sharing one listening socket (pre-fork, as gunicorn does).

The parent binds the socket, forks the workers, and from then on only supervises. It passes SIGTERM
and SIGINT on to every worker, and each drains its own streams (proxy/drain.py). When a worker dies
unexpectedly the parent stops the others and exits non-zero, so the orchestrator restarts the set:
half a service that looks healthy is worse than a restart. Workers share nothing in memory, so more
than one needs shared storage (`BFF_STORAGE_URL=redis://...`): sessions, limits and stream slots must
hold whichever worker the kernel hands a connection to.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger("proxy.workers")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def run_workers(count: int, work: Callable[[], None]) -> int:
    """Run `work()` in `count` forked processes until they end; the exit status for the parent."""
    children: set[int] = set()
    stopping = False

    def stop(sig: int, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    # Installed before forking, so a signal that arrives meanwhile is not lost with the parent.
    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    parent = os.getpid()
    for _ in range(count):
        if stopping:
            break
        # Held back from fork until the child is in `children`: a stop in between would miss it.
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
            _detach_from_terminal_and_follow_parent(parent)
            _run_child(work)
        children.add(pid)
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
    status = 0
    while children:
        pid, wait_status = os.wait()  # resumed after a signal handler ran (PEP 475)
        children.discard(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if not stopping:
            logger.error("worker %s exited (%s); stopping the others", pid, code)
            status = 1
            stop(signal.SIGTERM)
    return status


def _detach_from_terminal_and_follow_parent(parent: int) -> None:
    """Ctrl+C in a terminal signals the whole process group: a worker would get SIGINT twice (from the
    terminal and from the parent), and uvicorn takes a second SIGINT as "exit now, skip the drain".
    In a group of its own it hears only the parent. And if the parent is killed outright (SIGKILL),
    Linux sends the worker SIGTERM, so it drains instead of serving on, orphaned."""
    os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):  # PR_SET_PDEATHSIG is Linux-only
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _run_child(work: Callable[[], None]) -> None:
    code = 0
    try:
        work()
    except BaseException:
        logger.exception("worker failed")
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)
