"""torchrun, with what pre-emption on a cluster needs (scripts/_launch.sh runs every multi-process job through it).

    python -m llava_sft.launch [torchrun options] -m llava_sft.train CONFIG [key=value ...]

The options are torchrun's own (it runs in this process). What changes (llava_sft/preemption.py says why):

* **SIGUSR1** (SLURM's `--signal=USR1@SECONDS` notice) is passed on to the ranks. torchrun handles only
  SIGTERM/SIGINT/SIGHUP/SIGQUIT, so SIGUSR1 used to kill it (exit 138) and orphan the ranks.
* **The first SIGTERM** is passed on to the ranks and torchrun keeps waiting: the ranks write the checkpoint of the
  step they are in and exit 75, however long that takes. torchrun's own answer (SIGTERM to each rank's process
  group, DataLoader workers included, then SIGKILL 30 s later) is kept for a second SIGTERM and for
  SIGINT/SIGHUP/SIGQUIT. The time a checkpoint may take is then the cluster's grace period (SLURM's KillWait,
  Kubernetes' terminationGracePeriodSeconds), not torchrun's 30 s.
* **The exit status** is 75 when the ranks were pre-empted -- every rank that failed exited 75, or died of a
  pre-emption signal or of torchrun stopping it after another rank's exit 75 -- so that a requeue script can test
  `[ $? -eq 75 ]` (scripts/slurm/). Anything else: torchrun's own report and status.

The ranks are found as torchrun starts them: child processes that lead their own session (torchrun's
`start_new_session=True`). A signal is sent to the rank alone, not to its process group: its loader workers ignore
both signals anyway and end with it.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from llava_sft.preemption import EXIT_PREEMPTED

PREEMPTION_DEATHS = {-signal.SIGTERM, -signal.SIGKILL, -signal.SIGUSR1}


def rank_processes(parent: int | None = None) -> list[int]:
    """Children of `parent` (this process) that lead their own session: the ranks torchrun started."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        pid, ppid, session = int(entry.name), int(fields[1]), int(fields[3])
        if ppid == parent and session == pid:
            found.append(pid)
    return found


class Forwarder:
    """Passes the pre-emption notice on to the ranks; remembers that it did."""

    def __init__(self):
        self.received: list[str] = []

    def forward(self, signum: int) -> int:
        """Pass the signal on to every rank; the number of ranks it reached."""
        self.received.append(signal.Signals(signum).name)
        ranks = rank_processes()
        print(f"[launch] {signal.Signals(signum).name}: passed on to {len(ranks)} rank(s) {ranks}; they checkpoint "
              f"at the next step boundary and exit {EXIT_PREEMPTED}", file=sys.stderr, flush=True)
        for pid in ranks:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        return len(ranks)

    def install(self) -> None:
        signal.signal(signal.SIGUSR1, lambda signum, frame: self.forward(signum))
        import torch.distributed.elastic.multiprocessing.api as elastic

        torchrun_handler = elastic._terminate_process_handler  # installed by torchrun as its workers start

        def on_terminate(signum, frame):
            if signum == signal.SIGTERM and "SIGTERM" not in self.received and self.forward(signum):
                return  # the first SIGTERM reached the ranks: they save and exit 75; torchrun keeps waiting
            # a second notice, another signal, or no rank running yet (nothing to save): torchrun's own answer
            torchrun_handler(signum, frame)  # raises torchrun's SignalException: it stops the workers

        elastic._terminate_process_handler = on_terminate


def preempted(exit_codes: list[int], signalled: bool) -> bool:
    """Did the ranks stop for pre-emption? Every failed rank exited 75, or died of a pre-emption signal or of
    torchrun's SIGTERM/SIGKILL after another rank's 75 (or after the notice this launcher passed on)."""
    if not exit_codes or any(c not in PREEMPTION_DEATHS | {EXIT_PREEMPTED} for c in exit_codes):
        return False
    return EXIT_PREEMPTED in exit_codes or signalled


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    forwarder = Forwarder()
    forwarder.install()
    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as e:
        codes = [failure.exitcode for failure in e.failures.values()]
        if preempted(codes, bool(forwarder.received)):
            print(f"[launch] pre-empted ({', '.join(forwarder.received) or 'the ranks were signalled'}): the ranks "
                  f"exited {codes} after writing a checkpoint; run the same command again to continue "
                  f"(exit {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
