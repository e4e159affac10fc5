"""Where a study's runs execute (``[study] executor`` and ``jobs``): this process, worker processes on this
machine, or Slurm jobs submitted through submitit.

A study is a graph of independent runs in two waves (the baseline, one model per method and the control;
then, once their gains are known, the Top-k models) followed by the report. Each run is a :class:`RunTask`;
:func:`execute` trains and evaluates it (``ser_toolkit.study.run_model``: reused when already done on this
data) while holding the run's lock ``RUNS_DIR/.locks/RUN.lock``, so two jobs never write one run.

- ``local``, ``jobs = 1``: one run after another in this process (live epochs).
- ``local``, ``jobs = N``: N persistent worker processes (forkserver: nothing inherited from the parent,
  CUDA included), each bound to one visible GPU (``CUDA_VISIBLE_DEVICES``; ``runs_per_gpu`` workers per GPU,
  each limited to that share of its memory) and to CPUs / N math threads.
- ``slurm``: one Slurm job per run (``[study] slurm``: partition, GPUs, CPUs, memory, time, setup lines),
  at most ``jobs`` queued at once (0: all).
- ``submitit-local``: the same submitit code path with subprocess jobs on this machine.

Crash safety: each submitted job is recorded in ``RUNS_DIR/.jobs/RUN.json``. After the orchestrator dies
(kill -9, a lost login node) ``sertk study`` again reuses the finished runs, waits for a run whose recorded
Slurm job is still queued or running (re-attached by its id), and submits the rest again; a new job of a
run that a job of the old orchestrator still holds waits for its lock, then reuses or resumes the run.
On Ctrl-C local workers are stopped (every write is atomic; the next invocation resumes) and Slurm jobs
are left to finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ser_toolkit.errors import SertkError
from ser_toolkit.memory import GPU_SHARE_ENV

LIVE_SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                     "REQUEUE_HOLD", "REQUEUE_FED")
"""Slurm job states in which a recorded job of an earlier orchestrator is waited for, not resubmitted."""
POLL_SECONDS = {"slurm": 15.0, "submitit-local": 0.5}


@dataclass(frozen=True)
class RunTask:
    """One run of a study: where it goes, its resolved training settings and what it is for."""

    run_dir: str  # absolute: jobs may start in another folder, or on another host
    train: dict  # the resolved TrainConfig (asdict)
    digest: str  # content digest of the training cache: a run on other data is retrained
    selection: bool  # also evaluate the validation part (for gains and weights)
    name: str  # the model, e.g. noise or top2
    seed: int
    fold: int | None = None
    command: tuple[str, ...] = ()  # the sertk command line that planned it (recorded in the run's config)
    oom_retry: bool = False  # [study] oom_retry: once more with half the batch after running out of memory

    @property
    def run(self) -> str:
        return Path(self.run_dir).name


@dataclass
class Outcome:
    """What :func:`execute` reports: the run's state (trained, reused, resumed...) or its error."""

    state: str = ""
    seconds: float = 0.0
    error: str | None = None
    hint: str = ""
    detail: str = ""  # a traceback, for errors that are not SertkError
    started: float = 0.0  # wall-clock (time.time) start and end, and where it ran
    ended: float = 0.0
    host: str = ""
    pid: int = 0


def lock_path(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir.parent / ".locks" / f"{run_dir.name}.lock"


def execute(task: RunTask, log: Any = None) -> Outcome:
    """Train and evaluate ``task``'s run (reused when done), holding its lock; errors come back as values.

    ``log``: the study's progress reporter when run in the orchestrating process (live epochs), else None.
    """
    from ser_toolkit import atomic
    from ser_toolkit.study import run_model
    from ser_toolkit.training.loop import TrainConfig

    t0, where = time.perf_counter(), {"started": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
    try:
        with atomic.exclusive_lock(lock_path(task.run_dir), f"waiting for {task.run}: another sertk job holds it"):
            state = run_model(Path(task.run_dir), TrainConfig(**task.train), log or _silent, task.digest,
                              selection=task.selection, command=list(task.command) or None,
                              oom_retry=task.oom_retry)
    except SertkError as exc:
        return Outcome(error=exc.message, hint=exc.hint or "", seconds=time.perf_counter() - t0, ended=time.time(),
                       **where)
    except Exception as exc:  # noqa: BLE001 - reported by the orchestrator, with the traceback under --debug
        return Outcome(error=f"{type(exc).__name__}: {exc}", detail=traceback.format_exc(),
                       seconds=time.perf_counter() - t0, ended=time.time(), **where)
    return Outcome(state=state, seconds=time.perf_counter() - t0, ended=time.time(), **where)


def _silent(*_: Any) -> None:
    pass


# ---------------------------------------------------------------------------- the orchestrator side

def run_tasks(tasks: Sequence[RunTask], study: Mapping[str, Any], runs_dir: Path, progress) -> list[Outcome]:
    """Execute ``tasks`` as ``study`` (the ``[study]`` table) says; their outcomes, in order.

    Every task runs even when one fails (finished work is kept); the first error is then raised as
    ``run NAME failed: ...``.
    """
    executor, jobs = study.get("executor", "local"), int(study.get("jobs", 1))
    if not tasks:
        return []
    if executor == "local" and jobs <= 1:
        outcomes = []
        for task in tasks:
            progress.model_start(task.run, task.name, task.seed, task.fold)
            outcome = execute(task, progress)
            _record_outcome(runs_dir, task, outcome, {"executor": "local"})
            if outcome.error is None:
                progress.model_end(outcome.state)
            else:
                progress.model_end("failed")
                _raise(task, outcome, runs_dir)
            outcomes.append(outcome)
        return outcomes
    if executor == "local":
        runner: _Runner = _LocalPool(jobs, study)
    else:
        runner = _Submitit(executor, jobs, study, runs_dir)
    progress.parallel = max(1, min(runner.slots, len(tasks)))
    try:
        return _drive(runner, list(tasks), runs_dir, progress)
    finally:
        progress.parallel = 1


def _raise(task: RunTask, outcome: Outcome, runs_dir: Path) -> None:
    if outcome.detail:
        from ser_toolkit import atomic

        log = runs_dir / ".jobs" / f"{task.run}.error.txt"
        atomic.write_text(log, outcome.detail)
        raise SertkError(f"run {task.run} failed: {outcome.error}", f"the traceback is in {log}")
    raise SertkError(f"run {task.run} failed: {outcome.error}", outcome.hint or "fix it and run sertk study again")


class _Runner:
    """Starts tasks and says which have finished (the two implementations below)."""

    slots: int
    attached = ""  # after start(): how the last task was re-attached to an earlier job ("" if it was started)

    def start(self, task: RunTask) -> Any: ...

    def finished(self, handle: Any) -> bool: ...

    def outcome(self, handle: Any, task: RunTask) -> Outcome: ...

    def wait(self, handles: Sequence[Any]) -> None: ...

    def stop(self, handles: Sequence[Any]) -> str: ...

    def close(self) -> None: ...


def _drive(runner: "_Runner", tasks: list[RunTask], runs_dir: Path, progress) -> list[Outcome]:
    outcomes: dict[int, Outcome] = {}
    running: dict[int, Any] = {}
    waiting = list(range(len(tasks)))
    failed: tuple[RunTask, Outcome] | None = None
    try:
        while waiting or running:
            while waiting and len(running) < runner.slots and failed is None:
                i = waiting.pop(0)
                running[i] = runner.start(tasks[i])
                how = runner.attached or "start"
                progress.say(f"{how} {tasks[i].run} ({len(running)} running, {len(waiting)} waiting)")
            if failed is not None:
                waiting.clear()
            if not running:
                break
            runner.wait(list(running.values()))
            for i in [i for i, h in running.items() if runner.finished(h)]:
                outcome = runner.outcome(running.pop(i), tasks[i])
                outcomes[i] = outcome
                task = tasks[i]
                _record_outcome(runs_dir, task, outcome)
                progress.model_done(task.run, task.name, task.seed, task.fold,
                                    outcome.state if outcome.error is None else "failed", outcome.seconds)
                if outcome.error is not None and failed is None:
                    failed = (task, outcome)
                    if running:
                        progress.say(f"{task.run} failed: {outcome.error}; waiting for the {len(running)} "
                                     "running, starting no more")
    except BaseException:
        message = runner.stop(list(running.values()))
        if message:
            progress.say(message)
        raise
    finally:
        runner.close()
    if failed is not None:
        _raise(*failed, runs_dir)
    return [outcomes[i] for i in range(len(tasks))]


def _record_outcome(runs_dir: Path, task: RunTask, outcome: Outcome, record: dict | None = None) -> None:
    """Add the outcome (state, seconds, when and where) to the run's job record ``RUNS_DIR/.jobs/RUN.json``
    (``record``: its other keys, else those on file)."""
    from ser_toolkit import atomic

    path = Path(runs_dir) / ".jobs" / f"{task.run}.json"
    if record is None:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}
    record["outcome"] = {k: v for k, v in dataclasses.asdict(outcome).items() if k != "detail"}
    atomic.write_text(path, json.dumps(record, indent=1) + "\n")


# ---------------------------------------------------------------------------- local worker processes

_SLOT: dict[str, Any] = {}


def gpu_slots(jobs: int, gpus: Sequence[str], per_gpu: int) -> list[str | None]:
    """The GPU of each local job slot: ``per_gpu`` consecutive slots per visible GPU; None without GPUs.
    More jobs than GPUs x ``per_gpu`` is refused (they would share GPUs unannounced)."""
    if not gpus:
        return [None] * jobs
    if jobs > len(gpus) * per_gpu:
        raise SertkError(f"--jobs {jobs} runs at a time need {-(-jobs // per_gpu)} GPUs at {per_gpu} run(s) per GPU; "
                         f"this machine shows {len(gpus)}", f"pass --jobs {len(gpus) * per_gpu}, or --runs-per-gpu "
                         f"{-(-jobs // len(gpus))} if the runs fit in a share of a GPU's memory")
    return [gpus[slot // per_gpu] for slot in range(jobs)]


def _init_worker(slots, gpus: Sequence[str | None], threads: int, share: float, orchestrator: int) -> None:
    """A local worker: ends with the ``orchestrator`` process (also after kill -9: it is the fork server's
    child, not the orchestrator's), takes a slot, binds to its GPU (:func:`gpu_slots`) and to ``threads``
    math threads."""
    from ser_toolkit.workers import exit_with, own_mp_tempdir

    exit_with(orchestrator)
    own_mp_tempdir()
    slot = slots.get()
    _SLOT["slot"] = slot
    if gpus[slot] is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot]
        if share < 1:
            os.environ[GPU_SHARE_ENV] = f"{share:.6f}"  # the training loop keeps to it
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (without initialising CUDA)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip() and g.strip() != "-1"]
    folder = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(folder.iterdir())))] if folder.is_dir() else []


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _LocalPool(_Runner):
    """``jobs`` persistent forkserver workers on this machine (a ``concurrent.futures`` process pool)."""

    def __init__(self, jobs: int, study: Mapping[str, Any]) -> None:
        import concurrent.futures as cf
        import multiprocessing as mp

        self.slots = jobs
        per_gpu = int(study.get("runs_per_gpu", 1))
        gpus = gpu_slots(jobs, visible_gpus(), per_gpu)
        from ser_toolkit.workers import own_mp_tempdir

        own_mp_tempdir()  # before the fork server starts: its socket lives there
        ctx = mp.get_context("forkserver")
        queue = ctx.Queue()
        for i in range(jobs):
            queue.put(i)
        self.pool = cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                           initargs=(queue, gpus, max(1, _cpus() // jobs), 1 / per_gpu,
                                                     os.getpid()))

    def start(self, task: RunTask):
        from ser_toolkit import atomic

        atomic.write_text(Path(task.run_dir).parent / ".jobs" / f"{task.run}.json",
                          json.dumps({"executor": "local"}, indent=1) + "\n")
        return self.pool.submit(execute, task)

    def finished(self, handle) -> bool:
        return handle.done()

    def outcome(self, handle, task: RunTask) -> Outcome:
        try:
            return handle.result()
        except Exception as exc:  # noqa: BLE001 - e.g. a worker killed (out of memory)
            return Outcome(error=f"its worker process died ({type(exc).__name__}: {exc})",
                           hint="run sertk study again: the run resumes from its last epoch")

    def wait(self, handles) -> None:
        import concurrent.futures as cf

        cf.wait(handles, return_when=cf.FIRST_COMPLETED)

    def stop(self, handles) -> str:
        for fut in handles:
            fut.cancel()
        for proc in list(getattr(self.pool, "_processes", {}).values()):
            with contextlib.suppress(Exception):
                proc.terminate()
        return "stopped the local workers; sertk study again resumes the unfinished runs" if handles else ""

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------- submitit (Slurm, or local jobs)

def submitit_executor(executor: str, study: Mapping[str, Any], runs_dir: Path):
    """The submitit executor of a study: Slurm (``executor = "slurm"``) or subprocess jobs (``submitit-local``),
    with each run's resources from ``[study] slurm``. Job files go to ``RUNS_DIR/.submitit/<job id>/``."""
    try:
        import submitit
    except ImportError:
        raise SertkError(f"executor '{executor}' needs submitit", "pip install submitit") from None
    slurm = study.get("slurm") or {}
    folder = Path(runs_dir).resolve() / ".submitit" / "%j"
    if executor == "slurm":
        if shutil.which("srun") is None or shutil.which("sbatch") is None:
            raise SertkError("executor 'slurm' needs Slurm, and sbatch/srun are not on this machine's PATH",
                             "run sertk study on the cluster's login node, or use --executor local")
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
        ex.update_parameters(**slurm_parameters(study))
    elif executor == "submitit-local":
        ex = submitit.LocalExecutor(folder=folder)
        gpus = visible_gpus()
        ex.update_parameters(timeout_min=int(slurm.get("time_min", 240)),
                             gpus_per_node=min(int(slurm.get("gpus", 1)), len(gpus)),
                             setup=list(slurm.get("setup", [])))
    else:
        raise SertkError(f"unknown executor {executor!r}", "use local, slurm or submitit-local")
    return ex


def slurm_parameters(study: Mapping[str, Any]) -> dict[str, Any]:
    """submitit's Slurm parameters for each run, from ``[study] slurm`` (see :data:`ser_toolkit.settings.SLURM`)."""
    slurm = study.get("slurm") or {}
    params: dict[str, Any] = {
        "time": int(slurm.get("time_min", 240)), "gpus_per_node": int(slurm.get("gpus", 1)),
        "cpus_per_task": int(slurm.get("cpus", 8)), "ntasks_per_node": 1, "nodes": 1,
        "mem": f"{int(round(float(slurm.get('mem_gb', 64)) * 1024))}M", "setup": list(slurm.get("setup", [])),
        "additional_parameters": {k.replace("-", "_"): v for k, v in (slurm.get("sbatch") or {}).items()},
        "signal_delay_s": 120}
    for key in ("partition", "account", "qos", "constraint"):
        if slurm.get(key):
            params[key] = slurm[key]
    return params


def slurm_script(study: Mapping[str, Any], runs_dir: Path, run: str = "RUN") -> str:
    """The sbatch script a run of the study is submitted with (submitit's own rendering; works without Slurm)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(runs_dir).resolve() / ".submitit" / "%j"
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, job_name=f"sertk-{run}", **slurm_parameters(study))


class _Submitit(_Runner):
    """One submitit job per run; recorded in ``RUNS_DIR/.jobs/RUN.json``; recorded live Slurm jobs re-attached."""

    def __init__(self, executor: str, jobs: int, study: Mapping[str, Any], runs_dir: Path) -> None:
        self.kind = executor
        self.ex = submitit_executor(executor, study, runs_dir)
        self.slots = jobs if jobs > 0 else 1 << 30
        self.records = Path(runs_dir).resolve() / ".jobs"
        self.poll = POLL_SECONDS[executor]

    def _record(self, task: RunTask) -> Path:
        return self.records / f"{task.run}.json"

    def _attach(self, task: RunTask):
        """The recorded Slurm job of ``task`` when it is still queued or running, else None."""
        if self.kind != "slurm":
            return None  # a local job is not re-attached: a new job waits for the old one's lock instead
        import submitit

        try:
            record = json.loads(self._record(task).read_text())
            job = submitit.SlurmJob(folder=record["folder"], job_id=str(record["job_id"]))
            return job if job.state in LIVE_SLURM_STATES else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def start(self, task: RunTask):
        from ser_toolkit import atomic

        job = self._attach(task)
        self.attached = f"re-attached to Slurm job {job.job_id}:" if job is not None else ""
        if job is None:
            self.ex.update_parameters(**({"job_name": f"sertk-{task.run}"} if self.kind == "slurm"
                                         else {"name": f"sertk-{task.run}"}))
            job = self.ex.submit(execute, task)
        atomic.write_text(self._record(task), json.dumps({
            "executor": self.kind, "job_id": str(job.job_id), "folder": str(job.paths.folder),
            "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}, indent=1) + "\n")
        return job

    def finished(self, handle) -> bool:
        return handle.done()

    def outcome(self, handle, task: RunTask) -> Outcome:
        try:
            result = handle.result()
        except Exception as exc:  # noqa: BLE001 - submitit's job failures: killed, timed out, cancelled
            last = str(exc).strip().splitlines()
            return Outcome(error=f"job {handle.job_id} ended without a result ({last[-1] if last else exc})",
                           hint=f"see {handle.paths.stderr}; sertk study again resumes the run")
        return result if isinstance(result, Outcome) else Outcome(error=f"job {handle.job_id} returned {result!r}")

    def wait(self, handles) -> None:
        while not any(h.done() for h in handles):
            time.sleep(self.poll)

    def stop(self, handles) -> str:
        if not handles:
            return ""
        if self.kind == "slurm":
            ids = " ".join(str(h.job_id) for h in handles)
            return (f"{len(handles)} Slurm job(s) keep running ({ids}): sertk study again waits for them "
                    f"(scancel {ids} to stop them)")
        for h in handles:
            with contextlib.suppress(Exception):
                h.cancel()
        return "stopped the local jobs; sertk study again resumes the unfinished runs"

    def close(self) -> None:
        pass


def describe(study: Mapping[str, Any]) -> str:
    """How the runs execute, in a few words (for the progress line)."""
    executor, jobs = study.get("executor", "local"), int(study.get("jobs", 1))
    if executor == "local":
        per_gpu = int(study.get("runs_per_gpu", 1))
        return "one run at a time" if jobs <= 1 else f"{jobs} runs at a time on this machine" + (
            f", {per_gpu} per GPU" if per_gpu > 1 and visible_gpus() else "")
    return f"{executor} jobs" + (f", at most {jobs} at a time" if jobs > 0 else "")
