"""The pre-emption signals, and who answers them.

A cluster gives notice before it kills a job: SLURM sends SIGTERM to every process of the job step at the end (and,
with `--signal=USR1@SECONDS`, SIGUSR1 that many seconds earlier), Kubernetes sends SIGTERM to the container's first
process. Only a rank's main process answers (train/guards.py PreemptionNotice: checkpoint at the next step boundary,
exit 75). Everything else must neither die of the signal nor pass it on as a crash:

* DataLoader workers and the start-up check's pool workers ignore both (`ignore_in_worker`): torch's worker handler
  lets a worker die of a SIGTERM its parent did not send, and the main process's child-exit handler then raises
  "DataLoader worker ... is killed by signal: Terminated" wherever it is -- no checkpoint, exit 1 (issue 38). The
  workers still end with their parent (torch's watchdog).
* torchrun handles SIGTERM/SIGINT/SIGHUP/SIGQUIT only: SIGUSR1 would kill it (exit 138) and orphan the ranks. Our
  launcher (llava_sft/launch.py) answers it instead.
"""
from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL ("try again"): a checkpoint was written, run the same command again


def ignore_in_worker(*_) -> None:
    """worker_init_fn / Pool initializer: the pre-emption signals are the rank's business, not its workers'.

    SIGUSR1 is ignored. SIGTERM is ignored unless the parent sent it: a DataLoader or Pool that shuts its workers
    down at exit sends SIGTERM (multiprocessing's terminate(), then an unbounded join), and a worker that ignored it
    too kept its rank from ever exiting (found by tests/test_cluster_runtime.py). So SIGTERM is blocked and one
    thread takes it with its sender (sigwaitinfo): from the parent the worker exits at once, as torch's own worker
    handler does; from anyone else it is dropped."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not Linux: torch's handler stays (a foreign SIGTERM kills the worker)
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # every thread started from now on blocks it too
    threading.Thread(target=_take_sigterm, args=(parent,), name="sigterm", daemon=True).start()


def _take_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)
