"""Report generation from stored run results: right rows and columns, numbers that match the JSON."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from helpers import seal_fake_run
from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.evaluation import compute_metrics, predictions_csv
from ser_toolkit.report import write_report

TESTS = ("test", "test-noise", "cross-other")


def fake_run(folder, plugins, seed, accuracy, rng):
    """A run folder with config and evaluations from predictions of a given accuracy."""
    (folder / "eval").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "train": {"plugins": plugins, "weights": None, "seed": seed}, "data": {"cache": str(folder / "none.h5")},
        "commit": "abc", "versions": {"sertk": "0.1.0"}, "hardware": {"cpus": 2}}))
    run_id = seal_fake_run(folder)
    summary = {}
    for t in TESTS:
        n = 70
        y = np.repeat(np.arange(7), 10) if not t.startswith("cross") else np.repeat(np.arange(5), 14)
        p = np.where(rng.random(n) < accuracy, y, rng.integers(0, 7, n))
        ids = [f"u{i}" for i in range(n)]
        probs = np.eye(7)[p]
        m = compute_metrics(y, p)
        table = predictions_csv(ids, y, probs)
        m.update(run_id=run_id, data={"digest": f"digest-of-{t}", "changed": False},
                 predictions_sha256=hashlib.sha256(table.encode()).hexdigest())
        (folder / "eval" / f"{t}.json").write_text(json.dumps(m))
        (folder / "eval" / f"{t}.predictions.csv").write_text(table)
        summary[t] = {k: m[k] for k in ("n", "accuracy", "weighted_f1", "macro_f1", "uar", "missing_emotions")}
    (folder / "eval" / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for name, plugins, acc in (("baseline", [], 0.5), ("duplicate", ["duplicate"], 0.55), ("noise", ["noise"], 0.8)):
        for seed in (1, 2):
            d = tmp_path / "runs" / f"{name}-s{seed}"
            fake_run(d, plugins, seed, acc, rng)
            out.append(d)
    return out


def table(md: str, heading: str) -> list[list[str]]:
    block = md.split(heading, 1)[1].split("\n\n", 2)[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines() if line.startswith("|")]


def test_headline_rows_columns_and_numbers(runs, tmp_path):
    out = write_report(runs, tmp_path / "reports" / "r.md")
    md = out.read_text()
    rows = table(md, "### weighted F1")
    assert rows[0] == ["test set", "baseline", "duplicate", "noise"]
    assert [r[0] for r in rows[2:]] == ["clean", "noise", "cross-corpus: other"]
    for r, test in zip(rows[2:], TESTS):
        for col, name in enumerate(("baseline", "duplicate", "noise"), start=1):
            vals = [json.loads((tmp_path / "runs" / f"{name}-s{s}" / "eval" / f"{test}.json").read_text())["weighted_f1"]
                    for s in (1, 2)]
            base = [json.loads((tmp_path / "runs" / f"baseline-s{s}" / "eval" / f"{test}.json").read_text())["weighted_f1"]
                    for s in (1, 2)]
            cell = r[col].strip("*")
            assert cell.startswith(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}"), (cell, vals)
            if name != "baseline":
                assert f"({np.mean(vals) - np.mean(base):+.3f})" in cell
        best = max(range(1, 4), key=lambda c: float(r[c].strip("*").split()[0]))
        assert r[best].startswith("**")
    numbers = json.loads((tmp_path / "reports" / "r" / "numbers.json").read_text())
    head = [n for n in numbers if n["section"] == "headline" and n["metric"] == "uar" and n["test"] == "test"]
    assert {n["model"] for n in head} == {"baseline", "duplicate", "noise"}
    for n in head:
        vals = [json.loads((tmp_path / "runs" / f"{n['model']}-s{s}" / "eval" / "test.json").read_text())["uar"]
                for s in (1, 2)]
        assert n["mean"] == pytest.approx(np.mean(vals)) and n["ci_low"] <= n["mean"] <= n["ci_high"]
    assert (tmp_path / "reports" / "r" / "numbers.csv").read_text().startswith("section,")


def test_every_section_and_figure(runs, tmp_path):
    md = write_report(runs, tmp_path / "r.md").read_text()
    for heading in ("## Headline", "### weighted F1", "### macro F1", "### UAR", "## Per-emotion F1",
                    "## Best model per emotion", "Pareto set", "## Augmentation gains and weights",
                    "## Confusion matrices", "## Each model against the baseline (paired)",
                    "## The control", "## Reproducibility"):
        assert heading in md, heading
    for fig in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (tmp_path / fig).is_file(), fig
    per_emotion = table(md, "#### clean")
    assert [r[0] for r in per_emotion[2:]] == list(EMOTIONS)
    paired = table(md, "## Each model against the baseline (paired)")
    assert [r[0] for r in paired[2:]] == ["duplicate", "noise"]
    assert "✱" in paired[3][1]  # 0.8 vs 0.5 accuracy on 70 utterances is an effect, not noise
    control = table(md, "## The control: more steps or better data?")
    assert control[2][0] == "noise" and control[2][1] == "clean"
    cross = table(md, "<details><summary>cross-corpus: other</summary>")
    assert cross[-1][1] == "n/a (absent)"  # surprise is absent from that corpus: reported, not dropped


def test_report_errors(tmp_path, cli):
    r = cli("report", tmp_path, "-o", tmp_path / "x.md")
    assert r.code == 2 and "neither a study folder" in r.err
