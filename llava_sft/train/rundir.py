"""One live run per run directory: a lock file with the owner's host, PID and start time.

Two jobs writing the same `train.output_dir` used to both exit 0 with every metrics row twice and checkpoints and the
final model overwriting each other. Now the second refuses at once, naming the owner. A lock left by a process
that no longer exists on this host (a crash, SIGKILL) is taken over with a message; a lock from another host
cannot be checked from here, so it refuses and names the file to delete if that job is gone.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_FILE = "RUN.lock"


class RunDirLocked(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.owner_record = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def acquire(self) -> "RunDirLock":
        for _ in range(2):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # atomic: one creator wins
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:  # read-only or full file system, no permission
                raise RunDirLocked(f"cannot write {self.path} ({e.strerror or e}): train.output_dir must be a "
                                   f"writable directory") from e
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner_record, f)
            return self
        raise RunDirLocked(f"{self.path.parent} is being taken by another run at the same moment; use another "
                           f"train.output_dir")

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            owner = {}
        where = f"{owner.get('host', '?')} PID {owner.get('pid', '?')}, started {owner.get('started', '?')}"
        if owner.get("host") == self.owner_record["host"] and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
            log.warning("%s: taking over the lock of a run that no longer exists (%s)", self.path, where)
            self.path.unlink(missing_ok=True)
            return
        if not owner and time.time() - self.path.stat().st_mtime > 60:  # a lock its writer never finished
            log.warning("%s: taking over an unreadable lock file older than a minute", self.path)
            self.path.unlink(missing_ok=True)
            return
        if owner.get("host") == self.owner_record["host"] or not owner:
            raise RunDirLocked(f"another run is using {self.path.parent} ({where}): wait for it, or choose another "
                               f"train.output_dir")
        raise RunDirLocked(f"{self.path.parent} is locked by a run on {where}; if that job is gone, delete "
                           f"{self.path}; otherwise choose another train.output_dir")

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == self.owner_record["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
