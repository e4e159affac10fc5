"""Report generation from stored run results: right rows and columns, numbers that match the JSON."""

from __future__ import annotations

import csv
import hashlib
import json
import re

import numpy as np
import pytest

from helpers import seal_fake_run
from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.evaluation import compute_metrics, predictions_csv, seal_evaluation
from ser_toolkit.report import files_of, write_report

TESTS = ("test", "test-noise", "cross-other")


def fake_run(folder, plugins, seed, accuracy, rng, **settings):
    """A run folder with config and evaluations from predictions of a given accuracy."""
    (folder / "eval").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "train": {"plugins": plugins, "weights": None, "seed": seed, **settings},
        "data": {"cache": str(folder / "none.h5")},
        "commit": "abc", "versions": {"sertk": "0.1.0"}, "hardware": {"cpus": 2}}))
    run_id = seal_fake_run(folder)
    (folder / "curves.csv").write_text("epoch,train_loss,valid_uar\n" + "".join(
        f"{e},{2 / e:.4f},{accuracy * (1 - 1 / (e + 1)):.4f}\n" for e in range(1, 6)))
    summary = {}
    for t in TESTS:
        n = 70
        y = np.repeat(np.arange(7), 10) if not t.startswith("cross") else np.repeat(np.arange(5), 14)
        p = np.where(rng.random(n) < accuracy, y, rng.integers(0, 7, n))
        ids = [f"u{i}" for i in range(n)]
        probs = np.eye(7)[p]
        m = compute_metrics(y, p)
        table = predictions_csv(ids, y, probs, [f"spk{i % 10}" for i in range(n)])
        m.update(run_id=run_id, data={"digest": f"digest-of-{t}", "changed": False},
                 predictions_sha256=hashlib.sha256(table.encode()).hexdigest())
        (folder / "eval" / f"{t}.json").write_text(json.dumps(m))
        (folder / "eval" / f"{t}.predictions.csv").write_text(table)
        summary[t] = {k: m[k] for k in ("n", "accuracy", "weighted_f1", "macro_f1", "uar", "missing_emotions")}
    (folder / "eval" / "summary.json").write_text(json.dumps(summary))
    seal_evaluation(folder / "eval", run_id, list(summary))


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for name, plugins, acc in (("baseline", [], 0.3), ("duplicate", ["duplicate"], 0.35), ("noise", ["noise"], 0.95)):
        for seed in (1, 2, 3):
            d = tmp_path / "runs" / f"{name}-s{seed}"
            fake_run(d, plugins, seed, acc, rng)
            out.append(d)
    return out


def table(md: str, *headings: str) -> list[list[str]]:
    """The first markdown table after ``headings`` (each searched after the previous one)."""
    for heading in headings:
        md = md.split(heading, 1)[1]
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip("|").split("|")])
    return block


def test_headline_rows_columns_and_numbers(runs, tmp_path):
    out = write_report(runs, tmp_path / "reports" / "r.md")
    md = out.read_text()
    rows = table(md, "### weighted F1")
    assert rows[0] == ["test set", "chance", "baseline", "duplicate", "noise"]
    assert [r[0] for r in rows[2:]] == ["clean", "noise", "cross-corpus: other"]
    for r, test in zip(rows[2:], TESTS):
        for col, name in enumerate(("baseline", "duplicate", "noise"), start=2):
            vals = [json.loads((tmp_path / "runs" / f"{name}-s{s}" / "eval" / f"{test}.json").read_text())["weighted_f1"]
                    for s in (1, 2, 3)]
            cell = r[col].strip("*")
            assert cell.startswith(f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f} ["), (cell, vals)  # sample SD
        best = max(range(2, 5), key=lambda c: float(r[c].strip("*").split()[0]))
        assert r[best].startswith("**")
    assert rows[2][1] == f"{1 / 7:.3f}"  # chance: a uniform guess among 7 emotions, balanced set
    numbers = json.loads((files_of(tmp_path / "reports" / "r.md") / "numbers.json").read_text())
    head = [n for n in numbers if n["section"] == "headline" and n["metric"] == "uar" and n["test"] == "test"]
    assert {n["model"] for n in head} == {"baseline", "duplicate", "noise"}
    for n in head:
        vals = [json.loads((tmp_path / "runs" / f"{n['model']}-s{s}" / "eval" / "test.json").read_text())["uar"]
                for s in (1, 2, 3)]
        assert n["mean"] == pytest.approx(np.mean(vals)) and n["ci_low"] <= n["mean"] <= n["ci_high"]
        assert n["sd"] == pytest.approx(np.std(vals, ddof=1)) and n["resampled"] == "speakers"
    assert (files_of(tmp_path / "reports" / "r.md") / "numbers.csv").read_text().startswith("section,")


def test_every_section_and_figure(runs, tmp_path):
    md = write_report(runs, tmp_path / "r.md").read_text()
    for heading in ("## Summary", "**Findings**", "## Results", "### weighted F1", "### UAR",
                    "## Differences to the baseline and the control", "## Emotion coverage", "## Per emotion",
                    "## Best model per emotion", "Pareto set", "## Augmentation gains and weights",
                    "## Confusion matrices", "## Learning curves", "## The control", "## Data", "## Reproducibility"):
        assert heading in md, heading
    # balanced sets: macro F1 = weighted F1, so its table is dropped and that is said once
    assert "### macro F1" not in md and md.count("Macro F1 equals weighted F1") == 1
    figs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {f.rsplit("/", 1)[1] for f in figs} >= {"difference.png", "per_emotion.png", "learning_curves.png",
                                                  "confusion_test.png", "confusion_cross-other.png"}
    for fig in figs:
        assert (tmp_path / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
    per_emotion = table(md, "#### clean")
    assert [r[0] for r in per_emotion[2:]] == [f"{e} (10)" for e in EMOTIONS]
    paired = table(md, "## Differences", "### UAR", "#### against baseline")
    assert paired[0] == ["model", "clean", "its own augmented set", "cross-corpus: other"]
    rows = {r[0]: r[1:] for r in paired[2:]}
    assert set(rows) == {"duplicate", "noise"} and rows["duplicate"][1] == "–"  # the control has no own set
    assert rows["noise"][0].startswith("**+")  # 0.95 vs 0.3 accuracy, 3 seeds: an effect
    assert rows["noise"][1].startswith("**noise: +")
    assert not rows["duplicate"][0].startswith("**")  # 0.35 vs 0.3: not an effect after adjustment
    against_control = table(md, "## Differences", "### UAR", "#### against duplicate")
    assert [r[0] for r in against_control[2:]] == ["noise"]
    summary = md.split("## Summary", 1)[1].split("## Results", 1)[0]
    assert re.search(r"noise improves clean UAR by \+0\.\d+ \[\+0\.\d+, \+0\.\d+\] over the baseline "
                     r"\(adjusted p = [0-9.e-]+\)", summary), summary
    assert "Nothing else changes UAR significantly against the baseline" in summary
    coverage = table(md, "## Emotion coverage of the test sets")
    cross = next(r for r in coverage if r[0] == "cross-corpus: other")
    assert cross[-2:] == ["**absent**", "**absent**"]  # disgust and surprise: said, not dropped
    control = table(md, "## The control: more steps or better data?")
    assert control[2][0] == "noise" and control[2][1] == "clean"


def test_one_seed_says_training_variance_is_unmeasured(runs, tmp_path):
    md = write_report([r for r in runs if r.name.endswith("-s1")], tmp_path / "r.md").read_text()
    assert "training variance is unmeasured" in md
    # one seed cannot tell an effect from seed luck: nothing is marked, the summary says why
    assert "One seed: differences to the baseline are not tested" in md
    paired = table(md, "## Differences", "### UAR", "#### against baseline")
    assert not any(cell.startswith("**") for row in paired[2:] for cell in row[1:])
    # and no p-value anywhere: not in the tables, not in the CSV
    assert not any("p=" in cell for row in paired[2:] for cell in row[1:])
    assert "One seed: not tested (no p-value" in md and "p adjusted together" not in md
    rows = list(csv.DictReader(open(files_of(tmp_path / "r.md") / "numbers.csv")))
    paired_rows = [r for r in rows if r["section"] == "paired"]
    assert paired_rows and all(r["p"] == "" and r["p_adjusted"] == "" for r in paired_rows)


def test_control_share_for_every_sign_combination():
    from ser_toolkit.report.analysis import control_share

    assert control_share(0.10, 0.04) == (pytest.approx(0.4), "")
    for model_gain, control_gain, why in [(0.10, -0.02, "control does not gain"), (0.10, 0.0, "control does not gain"),
                                          (0.05, 0.08, "as much or more"), (0.05, 0.05, "as much or more"),
                                          (-0.05, 0.02, "no gain"), (-0.05, -0.08, "no gain"), (0.0, 0.0, "no gain"),
                                          (0.005, 0.002, "no gain")]:
        share, reason = control_share(model_gain, control_gain)
        assert share is None and why in reason, (model_gain, control_gain, reason)


def test_chance_levels():
    from sklearn.metrics import f1_score

    from ser_toolkit.report.analysis import chance

    y = np.repeat(np.arange(3), [50, 30, 20])
    rng = np.random.default_rng(0)
    guesses = rng.integers(0, 7, size=(400, y.size))
    for metric, fn in (("weighted_f1", lambda p: f1_score(y, p, labels=range(7), average="weighted",
                                                          zero_division=0)),
                       ("macro_f1", lambda p: f1_score(y, p, labels=[0, 1, 2], average="macro", zero_division=0))):
        assert chance(y, metric) == pytest.approx(np.mean([fn(p) for p in guesses]), abs=0.02), metric
    assert chance(y, "uar") == chance(y, "accuracy") == pytest.approx(1 / 7)


def test_report_errors(tmp_path, cli):
    r = cli("report", tmp_path, "-o", tmp_path / "x.md")
    assert r.code == 2 and "neither a study folder" in r.err


def _consistent(report) -> str | None:
    """The generation a report shows, checked whole: every linked file exists in the folder it names."""
    if not report.exists():
        return None
    md = report.read_text()
    folder = files_of(report)
    assert folder.is_dir() and (folder / "numbers.json").is_file() and (folder / "numbers.csv").is_file()
    for fig in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (report.parent / fig).is_file() and (report.parent / fig).parent == folder, fig
    json.loads((folder / "numbers.json").read_text())
    return folder.name


@pytest.mark.timeout(900)  # above the subprocess limits inside
@pytest.mark.slow
def test_killed_report_leaves_the_old_one_or_the_new_one_whole(runs, tmp_path):
    """kill -9 of `sertk report` at random moments: the report is the previous one, or the new one complete."""
    import subprocess
    import sys
    import time

    report = tmp_path / "reports" / "r.md"
    write_report(runs, report)
    seen = {_consistent(report)}
    rng = np.random.default_rng(0)
    interrupted = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-m", "ser_toolkit", "report", *map(str, runs), "-o", str(report)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0.5, 8.0)))
        interrupted += proc.poll() is None
        proc.kill()
        proc.wait(timeout=60)
        seen.add(_consistent(report))
        leftovers = [p for p in report.with_suffix("").iterdir() if p.name != files_of(report).name]
        assert all(p.name.startswith(".tmp-") or p.name.startswith("r") for p in leftovers)
    write_report(runs, report)  # a complete run cleans what the killed ones left behind
    assert [p.name for p in report.with_suffix("").iterdir()] == [files_of(report).name]
    assert None not in seen and interrupted >= 2  # killed while writing, not only after it finished


def test_the_same_run_twice_is_never_two_replicates(runs, tmp_path):
    """Two studies of the same config and seed (copied, or run twice) are one replicate written twice: a
    report over both is refused, never "2 seeds"; runs of one name with other settings are not replicates."""
    import shutil

    from ser_toolkit.errors import SertkError

    twice = [shutil.copytree(r, tmp_path / "again" / r.name) for r in runs]
    with pytest.raises(SertkError, match=r"are the same run \(run id"):
        write_report(runs + twice, tmp_path / "r.md")
    # a copy under another folder name, or with its seed edited (and its seal recomputed), is still that run
    renamed = shutil.copytree(runs[0], tmp_path / "z" / "run2")
    with pytest.raises(SertkError, match="are the same run"):
        write_report(runs + [renamed], tmp_path / "r.md")
    # the same settings and seed trained again (another run id): one replicate, not two
    again = tmp_path / "again2" / "noise-s1"
    fake_run(again, ["noise"], 1, 0.95, np.random.default_rng(5))
    with pytest.raises(SertkError, match="the same settings and seed trained twice are one replicate"):
        write_report(runs + [again], tmp_path / "r.md")
    # another model of one name and seed (another study's): named apart by its settings, not "the same run"
    other = tmp_path / "other" / "noise-s1"
    fake_run(other, ["noise"], 1, 0.9, np.random.default_rng(1), lr=0.5)
    with pytest.raises(SertkError, match="are both named 'noise' but differ in lr"):
        write_report(runs + [other], tmp_path / "r.md")
    assert not (tmp_path / "r.md").exists()


def test_numbers_come_from_the_sealed_predictions_never_from_editable_json(runs, tmp_path):
    from ser_toolkit.errors import SertkError

    path = runs[0] / "eval" / "test.json"
    original = path.read_text()
    edited = json.loads(original)
    edited["uar"] = float("nan")
    path.write_text(json.dumps(edited))
    with pytest.raises(SertkError, match="was changed after the evaluation"):  # the evaluation's seal
        write_report(runs, tmp_path / "r.md")
    run_id = edited["run_id"]
    for field, value in (("uar", float("nan")), ("n", "many"), ("accuracy", 0.99)):
        path.write_text(json.dumps({**json.loads(original), field: value}))
        seal_evaluation(runs[0] / "eval", run_id, list(TESTS))  # even resealed, as anyone can
        with pytest.raises(SertkError, match=f"says {field} = .*but its predictions give"):
            write_report(runs, tmp_path / "r.md")
    assert not (tmp_path / "r.md").exists()
