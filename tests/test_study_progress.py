"""``sertk study``'s progress: plain lines when not on a terminal, --quiet, the estimate, the wall times kept."""

from __future__ import annotations

import json
import re

import pytest

from helpers import run_sertk
from ser_toolkit.progress import StudyProgress, as_reporter, duration, estimate_left
from ser_toolkit.study import _wall_times

TINY = """
name = "tiny"
[data]
options = { per_emotion = 2 }
cross = []
[model]
name = "acoustic"      # trained by epochs (the demo's svm is fitted once)
[training]
epochs = 4
workers = 1
[augmentations]
methods = ["noise"]
top_k = []
[study]
runs_dir = "runs/tiny"
report = "reports/tiny.md"
"""
MODELS = ["baseline", "noise", "duplicate"]
PLAIN = {"FORCE_COLOR": "", "TTY_COMPATIBLE": "", "TTY_INTERACTIVE": ""}  # not a terminal, whatever CI sets


def _study(tmp, *flags: str):
    r = run_sertk("study", "--preset", "demo", "--config", tmp / "tiny.toml", *flags, cwd=tmp, env=PLAIN,
                  timeout=300)
    assert r.code == 0, r.err
    return r, json.loads((tmp / "runs" / "tiny" / "study.json").read_text())


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    """The tiny study run twice in a subprocess (stdout a pipe): trained, then reused."""
    tmp = tmp_path_factory.mktemp("progress")
    (tmp / "tiny.toml").write_text(TINY)
    first = _study(tmp)
    second = _study(tmp)
    return tmp, first, second


def _in_order(lines: list[str], patterns: list[str]) -> list[str]:
    """The lines matching each pattern (regex, from the line's start), each after the previous one."""
    found, at = [], 0
    for p in patterns:
        for i in range(at, len(lines)):
            if re.match(p, lines[i]):
                found.append(lines[i])
                at = i + 1
                break
        else:
            raise AssertionError(f"no line {p!r} after line {at}:\n" + "\n".join(lines))
    return found


def _table(lines: list[str]) -> dict[str, str]:
    """The final table's rows: model -> state."""
    head = next(i for i, line in enumerate(lines) if re.match(r"model +seed +fold +state +seconds$", line))
    rows = [line.split() for line in lines[head + 1:head + 1 + len(MODELS)]]
    assert [r[:3] for r in rows] == [[m, "42", "-"] for m in MODELS], lines[head:]
    assert all(re.fullmatch(r"\d+\.\d", r[-1]) for r in rows)
    return {r[0]: " ".join(r[3:-1]) for r in rows}


@pytest.mark.timeout(1000)  # above the subprocess limits inside (the module fixture runs two studies)
@pytest.mark.slow
def test_plain_lines_say_phase_model_k_of_n_epochs_eta_and_end_with_a_table(twice):
    _, (r, study), _ = twice
    lines = r.out.splitlines()
    ends = _in_order(lines, [
        r"phase cache: caching corpora \(synthetic\)$", r"phase materialise: ", r"phase train: 3 models planned$",
        r"train 1/3 baseline-s42$", r"  baseline-s42 epoch 1/4: train loss \d", r"  baseline-s42 epoch 4/4: ",
        r"  evaluate baseline-s42$", r"baseline-s42: trained in \d+\.\d s; 1/3 done, elapsed .*, ETA ",
        r"train 2/3 noise-s42$", r"noise-s42: trained in .* 2/3 done",
        r"train 3/3 duplicate-s42$", r"duplicate-s42: trained in .* 3/3 done, elapsed .*, ETA 0 s$",
        r"phase gains: ", r"phase report: writing reports/tiny.md$", r"report: reports/tiny.md$",
        r"3 models \(3 trained\) in ", r"model +seed +fold +state +seconds$"])
    assert re.search(r"ETA \d+ (s|min \d\d s|h \d\d min)$", ends[7])  # an estimate once a model was trained
    assert lines[-1] == "reports/tiny.md written"
    assert _table(lines) == dict.fromkeys(MODELS, "trained")
    assert "\x1b" not in r.out and "━" not in r.out  # no live display, no colours
    assert [x["name"] for x in study["runs"]] == MODELS
    assert study["wall_seconds"] == study["wall_seconds_first"] == study["wall_seconds_last"] > 0
    assert [{k: v for k, v in i.items() if k not in ("finished", "seconds")} for i in study["invocations"]] == \
        [{"runs": 3, "trained": 3, "reused": 0, "resumed": 0, "retrained": 0}]


@pytest.mark.timeout(1000)
@pytest.mark.slow
def test_a_rerun_reuses_every_model_and_keeps_the_training_wall_time(twice):
    _, (_, first), (r, study) = twice
    lines = r.out.splitlines()
    for k, model in enumerate(MODELS, 1):
        assert f"train {k}/3 {model}-s42" in lines
        eta = "unknown" if k < 3 else "0 s"  # nothing trained: unknown, until nothing is left
        assert any(re.fullmatch(rf"{model}-s42: reused in \d+\.\d s; {k}/3 done, elapsed .*, ETA {eta}", x)
                   for x in lines), r.out
    assert not any(" epoch " in x or x.startswith("  evaluate") for x in lines)  # nothing trained or evaluated
    assert _table(lines) == dict.fromkeys(MODELS, "reused")
    assert study["wall_seconds"] == study["wall_seconds_first"] == first["wall_seconds"]
    assert study["wall_seconds_last"] == study["invocations"][-1]["seconds"]
    assert study["invocations"][0] == first["invocations"][0]
    assert {k: study["invocations"][1][k] for k in ("runs", "trained", "reused")} == \
        {"runs": 3, "trained": 0, "reused": 3}


@pytest.mark.timeout(1000)
@pytest.mark.slow
def test_quiet_prints_only_the_report_path(twice):
    tmp, (_, first), _ = twice
    r, study = _study(tmp, "--quiet")
    assert r.out.splitlines() == ["reports/tiny.md written"] and r.err == ""
    assert study["wall_seconds"] == first["wall_seconds"] and len(study["invocations"]) == 3


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_estimate_arithmetic():
    assert estimate_left([], 5) is None  # nothing trained yet: unknown
    assert estimate_left([], 0) == 0.0  # ... unless nothing is left
    assert estimate_left([10.0, 20.0], 4) == 60.0  # mean 15 per model left
    assert estimate_left([10.0], 0) == 0.0
    assert estimate_left([10.0], 3, running_for=4.0) == 6.0 + 20.0  # the running model counts its seconds so far
    assert estimate_left([10.0], 2, running_for=25.0) == 10.0  # never below 0 for the running one
    assert (duration(None), duration(42.4), duration(185), duration(3725)) == \
        ("unknown", "42 s", "3 min 05 s", "1 h 02 min")


def test_reporter_counts_models_and_estimates_from_trained_ones_only():
    lines: list[str] = []
    clock = Clock()
    p = StudyProgress(lines.append, clock=clock)
    p.plan(4, topk_pending=True)
    assert p.eta_text() == "unknown" and p.of(1) == "1/4 (+ top-k)"
    p.model_start("baseline-s42", "baseline", 42)
    p.model_end("reused")  # reused runs cost ~0 and say nothing of training: still unknown
    assert p.eta() is None and lines[-1].endswith("1/4 (+ top-k) done, elapsed 0 s, ETA unknown")
    p.model_start("noise-s42", "noise", 42)
    for e in range(1, 21):
        clock.now += 0.5
        p.epoch({"epoch": e, "train_loss": 1.0 / e, "seconds": 0.5, "epochs": 20})
    assert sum(" epoch " in x for x in lines) == 10  # about every 10 % of the epochs
    assert lines[-1] == "  noise-s42 epoch 20/20: train loss 0.0500"
    p.model_end("trained")
    assert p.eta() == 20.0  # two left at 10 s each
    assert lines[-1] == "noise-s42: trained in 10.0 s; 2/4 (+ top-k) done, elapsed 10 s, ETA 20 s (+ top-k)"
    p.model_start("duplicate-s42", "duplicate", 42)
    clock.now += 30
    p.model_end("retrained (config changed)")
    assert p.eta() == 20.0  # mean (10 + 30) / 2 for the one left
    p.topk_known(2)  # the gains chose the Top-k models: N grows
    assert (p.planned, p.pending_topk, p.of(4)) == (6, 0, "4/6")
    assert p.eta() == 60.0
    p.model_start("x-s42", "x", 42)
    clock.now += 5
    p.epoch({"epoch": 1, "train_loss": 1.0, "epochs": 2})
    assert p.eta() == 15.0 + 40.0  # the running model: 20 - 5 left, then two more at 20
    p.model_end("resumed")
    assert p.counts() == {"runs": 4, "trained": 1, "reused": 1, "resumed": 1, "retrained": 1}
    lines.clear()
    p.print_table()
    assert lines[0] == "4 models (1 trained, 1 resumed, 1 retrained, 1 reused) in 45 s"
    assert lines[1].split() == ["model", "seed", "fold", "state", "seconds"]
    assert lines[4].split() == ["duplicate", "42", "-", "retrained", "(config", "changed)", "30.0"]


def test_plain_log_functions_still_work_and_quiet_says_nothing():
    said: list[str] = []
    p = as_reporter(said.append)
    assert as_reporter(p) is p
    p("a message")
    p.phase("cache", "caching corpora (synthetic)")
    assert said == ["a message", "phase cache: caching corpora (synthetic)"]
    q = StudyProgress(said.append, quiet=True)
    q.plan(1)
    q.phase("train")
    q.model_start("baseline-s42", "baseline", 42)
    q.model_end("trained")
    q.print_table()
    assert said == ["a message", "phase cache: caching corpora (synthetic)"]


def test_wall_times_keep_the_invocation_that_trained(tmp_path):
    path = tmp_path / "study.json"
    trained = {"runs": 3, "trained": 3, "reused": 0, "resumed": 0, "retrained": 0}
    reused = {"runs": 3, "trained": 0, "reused": 3, "resumed": 0, "retrained": 0}
    first = _wall_times(path, 100.0, trained)
    assert (first["wall_seconds"], first["wall_seconds_first"], first["wall_seconds_last"]) == (100.0, 100.0, 100.0)
    path.write_text(json.dumps(first))
    second = _wall_times(path, 2.0, reused)
    assert (second["wall_seconds"], second["wall_seconds_first"], second["wall_seconds_last"]) == (100.0, 100.0, 2.0)
    assert [i["seconds"] for i in second["invocations"]] == [100.0, 2.0]
    path.write_text(json.dumps(second))
    third = _wall_times(path, 40.0, {**reused, "reused": 2, "retrained": 1})  # it trained again: its time
    assert (third["wall_seconds"], third["wall_seconds_first"], third["wall_seconds_last"]) == (40.0, 100.0, 40.0)
    path.write_text(json.dumps({"wall_seconds": 77.0}))  # a study.json from before the invocation history
    old = _wall_times(path, 3.0, reused)
    assert (old["wall_seconds"], old["wall_seconds_first"], old["wall_seconds_last"]) == (77.0, 77.0, 3.0)
