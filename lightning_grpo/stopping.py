"""Stop signals (SIGTERM from a scheduler, Ctrl+C) for `lightning-grpo`: graceful first, immediate second.

What a user sees:
- first SIGTERM or SIGINT during training: the current step finishes, a checkpoint of it is
  written, exit status 143 (SIGTERM) or 130 (SIGINT). Lightning does the step part (its SIGTERM
  handler sets `trainer.received_sigterm`, the loops stop between steps and raise
  `SIGTERMException`, on which `GRPOCheckpoint` saves); SIGINT is forwarded as SIGTERM so it
  behaves the same instead of reaching Lightning as a KeyboardInterrupt halfway through an update;
- first signal during an evaluation (the held-out evaluation, the visualiser and the monitor at
  the start or end of a fit, `validate`, `test`): the evaluation stops at its next batch or
  sampling step (`check_stop`, called by `evaluation.evaluate` and `rollout.ode_from`), its
  partial results are discarded, and in a fit the checkpoint of the last finished step is kept.
  Never inside a training step (a first-frame generation there also samples): a step stopped
  half-way would be saved with a prompt consumed and not trained on, and a resume would differ;
- second signal, anywhere: stop at once (`StopNow`), nothing more is saved;
- a run whose main thread is blocked (a collective that never returns, a hung data worker)
  cannot run Python signal handlers at all. A watchdog thread sees every signal through
  `signal.set_wakeup_fd`: 60 s after the first one it prints every thread's stack (where the run
  is stuck); after the second one it gives the main thread 5 s to stop by itself, then prints
  the stacks, kills the run's other ranks and exits the process with the same status.

Why hand-written: Lightning has no "interrupt an evaluation" nor "second signal" behaviour, and
its SIGTERM handler runs only when the main thread gets back to Python.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

EXIT_STATUS = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}
"""Exit status after a stop signal (the shell convention 128 + signal number): never 0, so a
scheduler does not take an interrupted run for a finished one."""

HARD_STOP_GRACE_S = 5.0
"""After the second signal, seconds the main thread has to stop by itself before the watchdog exits."""

REPORT_AFTER_S = 60.0
"""After the first signal, seconds before the watchdog prints the stacks of a run that has not stopped."""

SAFE_HOOKS = frozenset({"on_fit_start", "on_train_start", "on_train_end", "on_fit_end"})
"""Fit hooks in which an evaluation may be stopped: the state is that of a finished step."""


class StopRequested(SIGTERMException):
    """A stop signal arrived during an evaluation: stopped at its next batch (a SIGTERMException,
    so `GRPOCheckpoint` keeps the checkpoint of the last finished step)."""


class StopNow(KeyboardInterrupt):
    """A second stop signal: stop at once, without saving (the state may be half-updated)."""


class StopSignals:
    """The CLI's handlers for SIGINT and SIGTERM and the watchdog thread (see the module doc)."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal
        self.count = 0  # stop signals seen by the Python handler (forwarded ones not counted)
        self.trainer: Any = None
        self._forwarded_to_handler = 0
        self._forwarded_to_watchdog = 0
        self._watchdog_count = 0
        self._previous: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup = -1
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ installation
    def install(self) -> None:
        global _ACTIVE
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._pipe = (read, write)
        self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read,), name="lightning-grpo-stop-watchdog", daemon=True).start()
        _ACTIVE = self

    def restore(self) -> None:
        global _ACTIVE
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_wakeup)
        if self._pipe is not None:
            os.close(self._pipe[1])  # the watchdog reads EOF and ends
            self._pipe = None
        _ACTIVE = None

    # ------------------------------------------------------------------ main thread
    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM and self._forwarded_to_handler:
            self._forwarded_to_handler -= 1  # our own forwarding of a SIGINT (Lightning saw it first)
            return
        self.count += 1
        self.received = self.received or signum
        name = "SIGINT (Ctrl+C)" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.count >= 2:
            _say(f"{name} again: stopping at once, nothing more is saved")
            raise StopNow()
        if not self._lightning_handles_sigterm():
            _say(f"{name} before training started: stopping (nothing to save yet)")
            raise StopNow()
        _say(f"{name}: stopping after the current step or evaluation batch and saving a checkpoint (again to stop at once)")
        if signum == signal.SIGINT:  # Lightning acts on SIGTERM only: forward it
            with self._lock:
                self._forwarded_to_handler += 1
                self._forwarded_to_watchdog += 1
            os.kill(os.getpid(), signal.SIGTERM)

    def _lightning_handles_sigterm(self) -> bool:
        """Whether a Trainer's handler is installed (it wraps ours): a run is in progress."""
        return signal.getsignal(signal.SIGTERM) != self._on_signal

    def stop_requested_where_safe(self) -> bool:
        """A stop was requested and the main thread is in an evaluation that may be cut short."""
        if not self.count or self.trainer is None:
            return False
        fn = getattr(self.trainer.state, "fn", None)
        fn = getattr(fn, "value", fn)
        if fn in ("validate", "test", "predict"):
            return True
        module = getattr(self.trainer, "lightning_module", None)
        return fn == "fit" and getattr(module, "_current_fx_name", None) in SAFE_HOOKS

    # ------------------------------------------------------------------ watchdog thread
    def _watch(self, read: int) -> None:
        """Count stop signals from the wakeup pipe (written by the C-level handler, so even while
        the main thread is blocked); report a run that does not stop, exit after the second."""
        while True:
            try:
                data = os.read(read, 64)
            except OSError:
                return
            if not data:
                os.close(read)
                return
            for signum in data:
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                with self._lock:
                    if signum == signal.SIGTERM and self._forwarded_to_watchdog:
                        self._forwarded_to_watchdog -= 1
                        continue
                    self._watchdog_count += 1
                    count = self._watchdog_count
                first = self.received or signum
                if count == 1:
                    threading.Thread(target=self._report_if_still_running, args=(REPORT_AFTER_S,), daemon=True).start()
                elif count == 2:
                    threading.Thread(target=self._exit_if_still_running, args=(first,), daemon=True).start()

    def _report_if_still_running(self, delay: float) -> None:
        time.sleep(delay)
        if self._pipe is None or self._watchdog_count >= 2:
            return
        _say(f"still running {delay:.0f} s after the stop signal (a long step, or a hang: the stacks below show where); signal again to stop at once")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

    def _exit_if_still_running(self, first: int) -> None:
        time.sleep(HARD_STOP_GRACE_S)
        if self._pipe is None:  # the CLI returned meanwhile
            return
        _say(f"the run did not stop within {HARD_STOP_GRACE_S:.0f} s of the second signal (blocked outside Python: stacks below); exiting now without saving")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        launcher = getattr(getattr(self.trainer, "strategy", None), "launcher", None)
        kill = getattr(launcher, "kill", None)
        if callable(kill):  # the other ranks of a multi-process run started by this one
            try:
                kill(signal.SIGKILL)
            except Exception:
                pass
        sys.stderr.flush()
        os._exit(EXIT_STATUS.get(first, 1))


_ACTIVE: StopSignals | None = None


def attach(trainer: Any) -> None:
    """Tell the installed handlers which Trainer runs (to know when an evaluation may stop and
    which ranks to kill); a no-op without them (runs built in Python)."""
    if _ACTIVE is not None:
        _ACTIVE.trainer = trainer


def check_stop() -> None:
    """Raise `StopRequested` when a stop signal arrived and the caller is an evaluation that may be
    cut short (see the module doc); evaluation loops call it once per batch or sampling step."""
    if _ACTIVE is not None and _ACTIVE.stop_requested_where_safe():
        raise StopRequested()


def _say(message: str) -> None:
    """Write to stderr's file descriptor directly: a signal handler may interrupt a print in progress
    (`print` would then fail with a reentrant-call error)."""
    try:
        os.write(2, f"\n{message}\n".encode())
    except OSError:
        pass


__all__ = ["EXIT_STATUS", "StopNow", "StopRequested", "StopSignals", "attach", "check_stop"]
