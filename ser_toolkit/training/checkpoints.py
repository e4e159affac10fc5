"""Checkpoints of a training run: what is written, when, and from which memory.

After every epoch the resumable state (model, optimizer, scheduler, epoch, history) is copied into host
buffers allocated once per shape and reused (:class:`Snapshot`; pinned on CUDA, filled by non-blocking
copies that a CUDA event orders before the next step's updates), and a writer thread takes it from there:

- the best weights (validation improved) are copied into a host buffer of their own and written once, at
  the end, or together with a resumable state;
- the resumable state is written every ``checkpoint_every`` epochs (``--checkpoint-every``; never after
  the last epoch, which sealing would remove at once), and when training is interrupted by SIGTERM
  (which Slurm sends before it kills a job) or SIGINT: then the latest epoch's snapshot is written before
  the process ends, so ``0`` writes a state only then;
- at most one snapshot exists: a new one waits until the writer is done with the previous one (an epoch
  that needs nothing written skips the copy rather than wait).

Peak host memory for checkpoints: one state (weights + optimizer moments) + one copy of the weights.
Every file is written atomically; the best weights are always written before the state that refers to
their score, so a resumed run finds the best weights of the epochs it resumes after.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import threading
from pathlib import Path
from typing import Any, Callable

from ser_toolkit.training import runs

_POOL: dict[tuple, list[Any]] = {}
"""Pinned host buffers no snapshot holds now, by (shape, dtype, pinned): the next run of this process on a GPU
reuses them (allocating and pinning gigabytes costs seconds per run)."""
_POOL_LOCK = threading.Lock()


def _take(like, pin: bool):
    import torch

    key = (tuple(like.shape), like.dtype, pin)
    with _POOL_LOCK:
        free = _POOL.get(key)
        if free:
            return free.pop()
    return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)


def _give(buffers: list[Any]) -> None:
    """Pinned buffers go to the pool; pageable ones are freed (allocating them again costs little)."""
    with _POOL_LOCK:
        for t in buffers:
            if t.is_pinned():
                _POOL.setdefault((tuple(t.shape), t.dtype, True), []).append(t)


def release_pool() -> None:
    """Free the host buffers kept for later runs of this process."""
    with _POOL_LOCK:
        _POOL.clear()


class Buffers:
    """Host copies of a nested structure of tensors (dicts, lists, tuples), one buffer per tensor position,
    allocated on the first copy and reused by the next ones."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._buffers: dict[tuple, Any] = {}

    def copy(self, obj: Any, path: tuple = ()) -> Any:
        """``obj`` with every tensor replaced by its host buffer, into which it is copied (non-blocking on CUDA;
        the caller records an event before reading the buffers)."""
        import torch

        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            buf = self._buffers.get(path)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                if buf is not None:
                    _give([buf])
                buf = self._buffers[path] = _take(t, self.pin and t.device.type == "cuda")
            buf.copy_(t, non_blocking=t.device.type == "cuda")
            return buf
        if isinstance(obj, dict):
            return {k: self.copy(v, (*path, k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.copy(v, (*path, i)) for i, v in enumerate(obj))
        return copy.deepcopy(obj)

    def release(self) -> None:
        _give(list(self._buffers.values()))
        self._buffers.clear()


class Checkpoints:
    """The checkpoints of one training run (rank 0): snapshots, the best weights in memory, the writer thread.

    ``snapshot(...)`` after each epoch; ``finish(model, meta)`` writes the best weights at the end;
    ``interrupted()`` writes the latest snapshot when a signal stops training early.
    ``bytes_written`` counts what this invocation wrote; ``digests`` the SHA-256 of each file it wrote, for
    the seal (computed by the writer thread, so sealing need not read the files again).
    """

    def __init__(self, run_dir: Path, pin: bool, track_best: bool) -> None:
        self.folder = run_dir / "checkpoints"
        self.state_buffers = Buffers(pin)
        self.best_buffers = Buffers(False) if track_best else None
        self.bytes_written = 0
        self.digests: dict[str, tuple[int, int, str]] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._event: Any = None
        self._state: dict[str, Any] | None = None  # the snapshot in the buffers
        self._best: tuple[dict[str, Any], dict[str, Any]] | None = None  # (weights, metadata) in memory
        self._best_written = True  # the best weights on disk are those in memory (or there are none in memory)
        self._best_live: dict[str, Any] | None = None  # the last epoch's weights, in the model, are the best
        self.state_epoch_on_disk = 0
        self.snapshot_epoch = 0

    # -- the training thread
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self, epoch: int, state: dict[str, Any], best_meta: dict[str, Any] | None, write_state: bool,
                 names: list[str], last: bool = False) -> None:
        """Copy the state of ``epoch`` (1-based) into the buffers, then let the writer thread keep its weights
        as the best ones (``best_meta`` given: validation improved) and write the state (``write_state``).
        ``names``: the model's tensor names without tied aliases (the weights file's names). After the
        ``last`` epoch nothing is copied: :meth:`finish` comes next, and writes the model itself if that
        epoch's weights are the best."""
        import torch

        if last and not write_state:
            if best_meta is not None:
                self._best_live = dict(best_meta)
            return
        needed = write_state or best_meta is not None
        if not needed and self.busy():
            return  # the writer still holds the buffers: the interrupt snapshot stays one epoch older
        self.wait()
        held = self.state_buffers.copy(state)
        event = None
        if any(t.device.type == "cuda" for t in state["model"].values() if isinstance(t, torch.Tensor)):
            event = torch.cuda.Event()
            event.record()
        self._state, self._event, self.snapshot_epoch = held, event, epoch
        self._run(self._keep_and_write, best_meta, write_state, names)

    def _run(self, fn: Callable, *args: Any) -> None:
        self._thread = threading.Thread(target=self._guard, args=(fn, *args), name="sertk-checkpoint",
                                        daemon=False)  # the name: sertk's entry point waits for it
        self._thread.start()

    def _guard(self, fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # re-raised on the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Join the writer; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # -- the writer thread
    def _keep_and_write(self, best_meta: dict[str, Any] | None, write_state: bool, names: list[str]) -> None:
        if self._event is not None:
            self._event.synchronize()
        assert self._state is not None
        if best_meta is not None:
            weights = self._state["model"]
            if self.best_buffers is None:
                raise RuntimeError("best weights tracked without validation")
            self._best = (self.best_buffers.copy({k: weights[k] for k in names}), dict(best_meta))
            self._best_written = False
        if write_state:
            self._write_state()

    def _write_state(self) -> None:
        """The best weights if they changed, then the state in the buffers; older states removed."""
        assert self._state is not None
        self._write_best()
        path = self.folder / runs.STATE.format(epoch=self.snapshot_epoch)
        runs.save_checkpoint(path, self._state)
        self.bytes_written += path.stat().st_size
        self.state_epoch_on_disk = self.snapshot_epoch
        for old in sorted(self.folder.glob(runs.STATE_GLOB)):
            if old != path:
                old.unlink(missing_ok=True)

    def _write_best(self) -> None:
        if self._best is None or self._best_written:
            return
        self._record(runs.save_weights_dict(self.folder / runs.BEST, *self._best))
        self._best_written = True

    def _record(self, written: tuple[Path, str]) -> None:
        path, digest = written
        st = path.stat()
        self.digests[path.name] = (st.st_size, st.st_mtime_ns, digest)
        self.bytes_written += st.st_size

    # -- ends
    def interrupted(self, write: bool = True) -> BaseException | None:
        """Training stops early: a write in flight finishes, and with ``write`` (stopped by a signal) the latest
        snapshot and the best weights reach the disk, unless they are there already. After an error nothing
        more is written: resuming needs the same settings, which the error (out of memory, bad data) usually
        changes. Returns the error of a write that failed (a full disk: the news the user must get), else
        None; never raises."""
        failed: BaseException | None = None
        try:
            self.wait()
        except BaseException as exc:  # noqa: BLE001 - returned
            failed = exc
        if write and failed is None and self._state is not None and self.snapshot_epoch > self.state_epoch_on_disk:
            try:
                self._write_state()
            except Exception as exc:  # noqa: BLE001 - returned
                failed = exc
        self.close()
        return failed if write else None

    def finish(self, model, meta: dict[str, Any]) -> None:
        """Training ended: write the best weights (with validation: those kept in memory, unless already on
        disk, or the model's when the last epoch's are the best; without: ``model``'s, the last epoch's, with
        ``meta``). Reads ``model`` only: it may be evaluated meanwhile."""
        self.wait()
        self._state = None
        self.state_buffers.release()  # before the weights are serialised: peak memory stays one state
        if self.best_buffers is None or self._best_live is not None:
            self._record(runs.save_weights(self.folder / runs.BEST, model, self._best_live or meta))
        else:
            self._write_best()
        self.close()

    def load_best(self, model) -> None:
        """Put the selected weights into ``model`` (after the last epoch): those kept in memory, or the file's
        when an earlier invocation selected them; nothing to do when the model holds them already."""
        import torch

        self.wait()
        if self.best_buffers is None or self._best_live is not None:
            return
        if self._best is None:  # selected before this invocation resumed: on disk only
            from safetensors.torch import load_model

            load_model(model, str(self.folder / runs.BEST), strict=True)
            return
        live = model.state_dict()
        with torch.no_grad():
            for name, t in self._best[0].items():
                live[name].copy_(t)

    def best_weights(self) -> dict[str, Any] | None:
        """The best weights kept in memory by this invocation (None: those on disk are the best)."""
        return self._best[0] if self._best is not None else None

    def close(self) -> None:
        self.state_buffers.release()
        if self.best_buffers is not None:
            self.best_buffers.release()
        self._best = None


RECEIVED: list[int] = []
"""Every stop signal this process received (the command line says which one stopped it, and exits 128 + it)."""


class TrainingStopped(KeyboardInterrupt):
    """Training stopped by SIGTERM or SIGINT: ``epochs_done`` epochs have their state on disk (a resume
    starts after them), or the run was ``finished`` and sealed before the signal was acted on."""

    def __init__(self, signum: int, epochs_done: int, finished: bool = False) -> None:
        super().__init__(signum, epochs_done)
        self.signum, self.epochs_done, self.finished = signum, epochs_done, finished

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While active (main thread only), the first SIGTERM or SIGINT only sets :attr:`received`: the training
    loop stops at the next step and writes its checkpoint, and once training is over the run is sealed first.
    After :meth:`sealed` (nothing left to protect) a signal acts at once (:class:`TrainingStopped`, finished),
    and one that came before is delivered again; a second signal acts at once too (the previous handler:
    SIGINT's KeyboardInterrupt, or what the command set for SIGTERM)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self.epochs_done = 0
        self._ready = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def sealed(self) -> None:
        """The run is sealed (called from any thread): a signal received meanwhile is acted on now."""
        import os

        self._ready.set()
        if self.received is not None and self._previous:
            os.kill(os.getpid(), self.received)  # the handler raises in the main thread, wherever it is

    def _handle(self, signum: int, frame: Any) -> None:
        RECEIVED.append(signum)
        if self._ready.is_set():
            self.__exit__(None, None, None)
            self.received = None  # acted on here
            raise TrainingStopped(signum, self.epochs_done, finished=True)
        if self.received is not None:  # the second time: as if no handler were here
            self.__exit__(None, None, None)
            signal.raise_signal(signum)
            return
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
