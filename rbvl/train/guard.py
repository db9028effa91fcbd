"""What stops a run early, and how it says so: preemption signals and divergence.

    with StopSignals() as stop:           # SIGTERM (SLURM, Kubernetes), SIGUSR1 (SLURM's --signal), SIGINT (Ctrl-C)
        ...step...
        guard.after_step(step, status)    # raises Diverged after `train.max_nonfinite_steps` skipped steps in a row
        if stop.poll(dist): save; break   # every rank agrees on the step (one all-reduce of a flag)
    raise Preempted(...)                  # `rbvl train` prints its one line and exits 128 + the signal's number

A signal never interrupts a step: the handler only records it, the loop finishes the optimizer step it is in, writes a
checkpoint and stops. A second signal of the same kind gets the default behaviour (Ctrl-C twice stops at once).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(RuntimeError):
    """The run stopped on a signal after writing a checkpoint; the message is the one line the user sees."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum  # the shell's code for a process the signal ended: 143 for SIGTERM
        name = signal.Signals(signum).name
        super().__init__(f"rbvl train: stopped by {name} at step {step}; {checkpoint} written; resume with resume=true")


class Diverged(RuntimeError):
    """The loss or the gradients stayed non-finite for `train.max_nonfinite_steps` optimizer steps in a row."""


class StopSignals:
    """Records SIGTERM, SIGUSR1 and SIGINT while a run trains; `poll()` at a step boundary says whether to stop."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
            log.warning("%s: finishing this step, then writing a checkpoint", signal.Signals(signum).name)
        signal.signal(signum, self._stop_now)  # the same signal again stops at once

    def _stop_now(self, signum, frame) -> None:
        """A second signal of a kind: say what is left (no checkpoint of this step), then stop as the signal would
        (an ignored one stays ignored). os.write: a print could land inside a progress bar's own write."""
        previous = self._previous.get(signum, signal.SIG_DFL)
        if previous == signal.SIG_IGN:
            signal.signal(signum, signal.SIG_IGN)
            return
        if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 says it, as for the first
            name = signal.Signals(signum).name
            line = f"\nrbvl train: stopped at once by a second {name}: no checkpoint of this step was written; "
            os.write(2, (line + "resume=true continues from the newest complete checkpoint-N\n").encode())
        if callable(previous):  # Python's own (KeyboardInterrupt for Ctrl-C), or the caller's
            signal.signal(signum, previous)
            previous(signum, frame)
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # the signal's own end: exit code 128 + signum

    def poll(self, dist) -> int:
        """The signal that stops the run at this step boundary (0: none). Under torchrun one all-reduce of a flag per
        signal kind, so every rank stops at the same step even when only some of them got the signal."""
        if not dist.enabled:
            return self.signum
        flags = torch.tensor([float(self.signum == s) for s in STOP_SIGNALS], device=dist.device)
        dist.all_reduce(flags)
        got = [s for s, f in zip(STOP_SIGNALS, flags.tolist()) if f > 0]
        self.signum = self.signum or (int(got[0]) if got else 0)
        return self.signum


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a stop signal is the training process's to handle; it finishes its step with the
    batches the workers make and shuts them down itself.

    Ctrl-C (sent to the whole process group) and SIGUSR1 are ignored. The first SIGTERM is ignored too: a cluster sends
    it to every process of the job (SLURM's srun, a Kubernetes pod), and a worker that died of it would take the
    step and its checkpoint along. A second SIGTERM ends the worker, which is how multiprocessing stops a worker that
    did not exit when told to.
    """
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _first_sigterm)


def _first_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class DivergenceGuard:
    """Counts optimizer steps skipped because the loss or the gradients were not finite; stops the run after
    `train.max_nonfinite_steps` in a row (0 = never) with a line naming the step and the likely cause."""

    def __init__(self, cfg):
        self.limit = cfg.train.max_nonfinite_steps
        self.cfg = cfg
        self.in_a_row = 0

    def after_step(self, step: int, status: str) -> None:
        """`status` from `optimizer_step`: ok, overflow (fp16, the scaler's business) or nonfinite."""
        if status != "nonfinite":
            self.in_a_row = 0
            return
        self.in_a_row += 1
        log.warning("step %d: the loss or the gradients are not finite; the update was skipped", step)
        if self.limit and self.in_a_row >= self.limit:
            raise Diverged(
                f"training diverged at step {step}: the loss or the gradients were not finite for {self.in_a_row} "
                f"steps in a row (train.max_nonfinite_steps={self.limit}); {self.likely_cause()}; each was "
                "skipped, so every checkpoint holds finite weights"
            )

    def likely_cause(self) -> str:
        cfg = self.cfg
        if cfg.train.precision == "fp16":
            return "likely cause: fp16 overflow (try train.precision=bf16) or optim.lr=" + f"{cfg.optim.lr:g} too high"
        return f"likely cause: optim.lr={cfg.optim.lr:g} too high (try {cfg.optim.lr / 10:g})"
