"""What stops a run safely: pre-emption signals and non-finite steps (used by train/trainer.py).

* SIGTERM / SIGUSR1 set a flag (`PreemptionNotice`); at the next step boundary the ranks agree (`collectives.agree`), write the
  checkpoint of the finished step together, and the CLI exits 75 (`Preempted`).
* A step whose loss or gradient norm is not finite raises `NonFiniteStepError` on every rank (the values are
  global), naming the step and its samples; the CLI exits 3 and nothing is saved from that step.
"""
from __future__ import annotations

import math
import signal
import threading

from llava_sft.preemption import SIGNALS
from llava_sft.train.collectives import gather_objects


class Preempted(RuntimeError):
    """SIGTERM or SIGUSR1 arrived: every rank wrote the checkpoint of the step just finished (the CLI exits 75)."""

    def __init__(self, step: int, signal_name: str, path):
        super().__init__(f"{signal_name} received: stopped after step {step} with a checkpoint in {path}; run the "
                         f"same command again to continue (train.resume=auto)")


class PreemptionNotice:
    """Remembers SIGTERM (what SLURM and Kubernetes send before killing a job; torchrun forwards it to every rank
    and waits 30 s) and SIGUSR1 (SLURM's --signal=USR1@SECONDS notice) instead of dying mid-step."""

    SIGNALS = SIGNALS

    def __init__(self):
        self.signal_name, self._previous = "", {}

    def __enter__(self) -> "PreemptionNotice":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # after a notice the process is on its way out (exit 75): a second notice, or torchrun stopping this rank
            # because another one exited first, must not kill it while it shuts down
            signal.signal(sig, signal.SIG_IGN if self.requested else handler)

    def _note(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return bool(self.signal_name)


class BadSampleStop(RuntimeError):
    """data.bad_samples=error met a sample that start-up could not see (e.g. a corrupt image): the last complete
    step was checkpointed on every rank first (the CLI exits 4)."""

    def __init__(self, step: int, cause: str, checkpoint):
        saved = (f"a checkpoint of step {step} was written ({checkpoint})" if checkpoint else
                 "no step had completed, so there is no checkpoint")
        super().__init__(f"step {step + 1}: a bad sample stopped the run (data.bad_samples=error): {cause}. {saved}. "
                         f"Fix or remove the sample (python -m llava_sft.data.validate CONFIG --decode-images lists "
                         f"them all) or set data.bad_samples=skip, then run the same command again "
                         f"(train.resume=auto)")


def bad_sample_message(error: BaseException) -> str | None:
    """The BadSampleError behind a failed fetch: raised directly (num_workers=0), or re-raised by a DataLoader
    worker as a RuntimeError naming it; None for any other error."""
    from llava_sft.data.templates import BadSampleError

    if isinstance(error, BadSampleError):
        return str(error)
    text = str(error)
    if isinstance(error, RuntimeError) and "Caught BadSampleError" in text:
        return text.split("BadSampleError: ")[-1].strip().splitlines()[0]
    return None


class NonFiniteStepError(RuntimeError):
    """A step whose loss or gradient norm is not finite: the run stops, and nothing is saved from that step on."""

    def __init__(self, loss: float, grad_norm: float | None, ids: list, applied: bool, lr: float):
        super().__init__()
        self.loss, self.grad_norm, self.ids, self.applied, self.lr, self.step = loss, grad_norm, ids, applied, lr, None

    def __str__(self) -> str:
        norm = "" if self.grad_norm is None else f", gradient norm {self.grad_norm}"
        shown = ", ".join(map(str, self.ids[:20])) + (f" ... ({len(self.ids)} in all)" if len(self.ids) > 20 else "")
        return (f"step {self.step}: loss {self.loss}{norm} -- not finite. The step was "
                f"{'applied by the engine' if self.applied else 'not applied'}; nothing is saved from it (no "
                f"checkpoint, no final model: resume=auto continues from the last periodic checkpoint). Samples of "
                f"the step: {shown}. Fix: a lower train.lr (now {self.lr:g} at this step) or a longer warmup; check "
                f"these samples with python -m llava_sft.inspect.")


def stop_if_non_finite(loss: float, grad_norm: float | None, micro: list[dict], world: int, applied: bool,
                        lr: float) -> None:
    """Raise NonFiniteStepError on every rank (the values are global) naming the samples of all ranks."""
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    ids = [i for part in gather_objects([i for b in micro for i in b.get("ids", [])], world) for i in part]
    raise NonFiniteStepError(loss, grad_norm, ids, applied, lr)
