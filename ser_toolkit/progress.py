"""The progress of a ``sertk study``: phase, model k of N, epochs, elapsed and estimated time left, a final table.

:class:`StudyProgress` is what the study passes around (it is also callable
with a message, like the plain ``log`` functions it replaces). Three modes:

- plain (not a terminal: piped, redirected, under a test): one line per event,
  a phase starting (``phase cache: ...``), a model starting (``train 3/14
  noise-s42``), its epochs (about every 10 % of them), its end (``noise-s42:
  trained in 12.3 s; 3/14 done, elapsed 40 s, ETA 2 min 10 s``), the report
  written, then the table of every model as plain text;
- live (a terminal): rich progress bars (the study's models, the current
  model's epochs) with messages printed above them, then a rich table;
- quiet: nothing (errors are raised, the caller prints them).

N counts every run planned (models x seeds x folds x training corpora); the
Top-k models are known only once the single-method gains are, so until then
the counter and the estimate say ``(+ top-k)``. The estimate of the time left
is the mean seconds of the models trained (not reused) so far in this
invocation times the models left: "unknown" until one model was trained.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

REUSED = "reused"


def duration(seconds: float | None) -> str:
    """``seconds`` for people: ``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``; ``"unknown"`` for None."""
    if seconds is None:
        return "unknown"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def estimate_left(trained_seconds: list[float], remaining: int, running_for: float | None = None) -> float | None:
    """Seconds left: the mean of ``trained_seconds`` (models trained so far) per model of ``remaining``.

    ``remaining`` counts the model in progress, if any (``running_for``: its
    seconds so far; it is counted as the mean less those, never below 0).
    None while no model was trained (reused runs cost about nothing, and say
    nothing of what training costs) and some are left.
    """
    if remaining <= 0:
        return 0.0
    if not trained_seconds:
        return None
    mean = sum(trained_seconds) / len(trained_seconds)
    if running_for is None:
        return mean * remaining
    return max(0.0, mean - running_for) + mean * (remaining - 1)


@dataclass
class ModelRecord:
    """One run of the study in this invocation."""

    run: str  # the run folder's name, e.g. noise-f1-s42
    name: str  # the model, e.g. noise, top2
    seed: int
    fold: int | None = None
    corpus: str | None = None
    state: str = ""  # trained, reused, resumed, retrained (config changed), retrained (data changed)
    seconds: float = 0.0


def _print(line: str) -> None:
    print(line, flush=True)


class StudyProgress:
    """Reports a study's progress (see the module); ``emit`` takes the plain lines (default: print)."""

    def __init__(self, emit: Callable[[str], Any] | None = None, *, console=None, live: bool = False,
                 quiet: bool = False, clock: Callable[[], float] = time.perf_counter):
        self.emit = emit or _print
        self.console = console
        self.quiet = quiet
        self.live = live and not quiet
        self.clock = clock
        self.t0 = clock()
        self.planned = 0
        self.pending_topk = 0  # training corpora whose Top-k models are not known yet
        self.records: list[ModelRecord] = []
        self.current: ModelRecord | None = None
        self.corpora = 1
        self.corpus: str | None = None
        self._started = 0.0
        self._trains = False  # the current model has run an epoch
        self.parallel = 1  # runs executing at once (the ETA divides by it)
        self._progress = None
        self._overall = None
        self._epochs = None

    # ---- output
    def __call__(self, message: Any) -> None:
        """A free message (what a plain ``log`` function got)."""
        self.say(str(message))

    def say(self, line: str) -> None:
        if self.quiet:
            return
        if self.live:
            from rich.text import Text

            self._live().console.print(Text(line))
        else:
            self.emit(line)

    def _live(self):
        if self._progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
                TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                                      MofNCompleteColumn(), TimeElapsedColumn(), _info_column(self),
                                      console=self.console, transient=True)
            self._progress.start()
            self._overall = self._progress.add_task(self._phase_text("starting"), total=self.planned or None)
        return self._progress

    def _update(self, **fields: Any) -> None:
        if self.live:
            self._live().update(self._overall, total=self.planned or None, completed=len(self.records), **fields)

    def close(self) -> None:
        """Stop the live display (if any); what was printed stays."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # ---- events
    def phase(self, name: str, detail: str = "") -> None:
        """A phase of the study starts: cache, materialise, train, gains, report."""
        self.say(f"phase {self._phase_text(name)}" + (f": {detail}" if detail else ""))
        self._update(description=self._phase_text(name))

    def _phase_text(self, name: str) -> str:
        return name + (f" [{self.corpus}]" if self.corpus and self.corpora > 1 else "")

    def training_corpus(self, name: str | None, index: int, count: int, announce: bool = True) -> None:
        """The study's ``index``-th of ``count`` training corpora (``name``) is the current one."""
        self.corpus, self.corpora = name, count
        if announce and count > 1:
            self.say(f"training corpus {name} ({index} of {count})")

    def plan(self, models: int, topk_pending: bool = False) -> None:
        """``models`` more runs planned; ``topk_pending``: Top-k models will follow the gains."""
        self.planned += models
        self.pending_topk += bool(topk_pending)
        self._update()

    def topk_known(self, models: int) -> None:
        """The Top-k models of one training corpus are chosen: ``models`` more runs (0 when none)."""
        self.pending_topk = max(0, self.pending_topk - 1)
        self.planned += models
        self._update()

    def of(self, k: int) -> str:
        """``"k/N"``, with ``" (+ top-k)"`` while Top-k models are still to be chosen."""
        return f"{k}/{self.planned}" + (" (+ top-k)" if self.pending_topk else "")

    def model_start(self, run: str, name: str, seed: int, fold: int | None = None) -> None:
        self.current = ModelRecord(run, name, seed, fold, self.corpus if self.corpora > 1 else None)
        self._started, self._trains = self.clock(), False
        self.say(f"train {self.of(len(self.records) + 1)} {run}")
        self._update(description=f"{self._phase_text('train')} {self.of(len(self.records) + 1)} {run}")

    def evaluating(self) -> None:
        if self.current is None:
            return
        self.say(f"  evaluate {self.current.run}")
        self._update(description=f"{self._phase_text('evaluate')} {self.of(len(self.records) + 1)} "
                                 f"{self.current.run}")

    def epoch(self, row: Mapping[str, Any]) -> None:
        """A training epoch ended (``row``: the history row plus ``epochs``, see ``train(on_epoch=...)``)."""
        if self.current is None:
            return
        self._trains = True
        e, total = int(row["epoch"]), int(row.get("epochs") or row["epoch"])
        text = (f"train loss {row['train_loss']:.4f}" if "train_loss" in row else
                f"fitted, CV UAR {row.get('cv_uar') or float('nan'):.3f}") + (
            f", valid weighted F1 {row['valid_weighted_f1']:.3f}" if "valid_weighted_f1" in row else "")
        if self.live:
            progress = self._live()
            if self._epochs is None:
                self._epochs = progress.add_task("  epochs", total=total, info="")
            progress.update(self._epochs, total=total, completed=e, info=text)
        elif e % max(1, math.ceil(total / 10)) == 0 or e == total:
            self.say(f"  {self.current.run} epoch {e}/{total}: {text}")

    def model_end(self, state: str, seconds: float | None = None) -> ModelRecord:
        """The current model is done (``state`` from ``run_model``); ``seconds`` default: since its start."""
        rec = self.current
        if rec is None:
            raise RuntimeError("model_end without model_start")
        rec.state, rec.seconds = state, self.clock() - self._started if seconds is None else seconds
        self.records.append(rec)
        self.current = None
        if self._epochs is not None:
            self._live().remove_task(self._epochs)
            self._epochs = None
        self.say(f"{rec.run}: {state} in {rec.seconds:.1f} s; {self.of(len(self.records))} done, "
                 f"elapsed {duration(self.elapsed())}, ETA {self.eta_text()}")
        self._update()
        return rec

    def model_done(self, run: str, name: str, seed: int, fold: int | None, state: str,
                   seconds: float) -> ModelRecord:
        """A model that ran elsewhere (a worker process or a Slurm job) is done: one record, one line."""
        rec = ModelRecord(run, name, seed, fold, self.corpus if self.corpora > 1 else None, state, seconds)
        self.records.append(rec)
        self.say(f"{rec.run}: {state} in {seconds:.1f} s; {self.of(len(self.records))} done, "
                 f"elapsed {duration(self.elapsed())}, ETA {self.eta_text()}")
        self._update()
        return rec

    def report(self, path: Any) -> None:
        self.say(f"report: {path}")

    # ---- numbers
    def elapsed(self) -> float:
        return self.clock() - self.t0

    def eta(self) -> float | None:
        """Estimated seconds left for the runs planned (see :func:`estimate_left`)."""
        trained = [r.seconds for r in self.records if not r.state.startswith(REUSED)]
        running = self.clock() - self._started if self.current is not None and self._trains else None
        left = estimate_left(trained, self.planned - len(self.records), running)
        return None if left is None else left / max(1, self.parallel)

    def eta_text(self) -> str:
        left = self.eta()
        return duration(left) + (" (+ top-k)" if self.pending_topk and left is not None else "")

    def counts(self, corpus: str | None = None) -> dict[str, int]:
        """How many runs (of ``corpus``, or all) this invocation trained, reused, resumed and retrained."""
        out = {"runs": 0, "trained": 0, "reused": 0, "resumed": 0, "retrained": 0}
        for r in self.records:
            if corpus is None or r.corpus == corpus:
                out["runs"] += 1
                kind = r.state.split(" ")[0]  # "retrained (config changed)" -> retrained
                out[kind if kind in out else "trained"] += 1
        return out

    # ---- the final table
    def table_rows(self) -> tuple[list[str], list[list[str]]]:
        """The header and one row per model: model, seed, fold, (corpus,) state, seconds."""
        several = len({r.corpus for r in self.records}) > 1
        head = ["model", "seed", "fold", *(["corpus"] if several else []), "state", "seconds"]
        rows = [[r.name, str(r.seed), "-" if r.fold is None else str(r.fold), *([r.corpus or "-"] if several else []),
                 r.state, f"{r.seconds:.1f}"] for r in self.records]
        return head, rows

    def summary(self) -> str:
        c = self.counts()
        parts = ", ".join(f"{c[k]} {k}" for k in ("trained", "resumed", "retrained", "reused") if c[k])
        return f"{c['runs']} models ({parts or 'none'}) in {duration(self.elapsed())}"

    def print_table(self) -> None:
        """Every model of this invocation: a rich table on a terminal, plain text otherwise."""
        self.close()
        if self.quiet or not self.records:
            return
        head, rows = self.table_rows()
        if self.live:
            from rich.table import Table

            table = Table(title=self.summary(), title_justify="left")
            for h in head:
                table.add_column(h, justify="right" if h in ("seed", "fold", "seconds") else "left")
            for row in rows:
                table.add_row(*row, style="dim" if row[head.index("state")].startswith(REUSED) else None)
            (self.console or _console()).print(table)
            return
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        self.emit(self.summary())
        for row in [head, *rows]:
            self.emit("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip())


def _info_column(reporter: StudyProgress):
    """The live display's last column: the estimate for the study's bar, the loss for the epochs' bar."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Info(ProgressColumn):
        def render(self, task):
            if task.id == reporter._overall:
                return Text(f"ETA {reporter.eta_text()}")
            return Text(task.fields.get("info", ""))

    return Info()


def _console():
    from rich.console import Console

    return Console(highlight=False)


def as_reporter(log: Any) -> StudyProgress:
    """``log`` itself when it is a :class:`StudyProgress`, else a plain one whose lines go to ``log``."""
    if isinstance(log, StudyProgress):
        return log
    return StudyProgress(emit=None if log is print else log)


def for_console(console, quiet: bool = False) -> StudyProgress:
    """The reporter of ``sertk study``: live on an interactive terminal, plain lines otherwise, or quiet."""
    live = bool(console.is_interactive) and not quiet
    return StudyProgress(console=console, live=live, quiet=quiet)
