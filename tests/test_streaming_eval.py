"""Streaming evaluation: waveform models read a cache lazily, in length order, in batches bounded by seconds
of audio and by the batch size, and give back the probabilities in the order of the rows asked for."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import synthetic_cache
from ser_toolkit.cache.reader import CacheReader
from ser_toolkit.evaluation import length_batches, predict_features, predict_rows

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """14 synthetic utterances of unequal lengths (1.0 to 3.7 s)."""
    folder = synthetic_cache(tmp_path_factory.mktemp("cache"), per_emotion=1, speakers=1)
    reader = CacheReader(folder / "synthetic.h5")
    assert len(set(reader.lengths.tolist())) == len(reader)
    return reader


def wave_model(norm: str):
    """A tiny random HuBERT through sertk's model path (:func:`ser_toolkit.plugins.hubert._wrap`), its head
    scaled so that the probabilities are far from uniform (differences show)."""
    from transformers import HubertConfig, HubertForSequenceClassification

    from ser_toolkit.plugins.hubert import _wrap

    torch.manual_seed(3)
    cfg = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 2), conv_kernel=(10, 8, 4, 4),
                       num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=16,
                       num_labels=7, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer")
    hf = HubertForSequenceClassification(cfg)
    with torch.no_grad():
        hf.classifier.weight.mul_(300.0)
    return _wrap(hf, None, probe=False)


def shuffled_rows(reader, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).permutation(len(reader)).tolist()


def test_length_batches_respect_count_and_seconds():
    lengths = [5, 1, 9, 3, 3, 30, 2, 8]
    batches = length_batches(lengths, batch_size=3, max_samples=16)
    assert [b.tolist() for b in batches] == [[1, 6, 3], [4, 0], [7], [2], [5]]  # stable length order
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches:  # count x longest within the budget, unless one utterance alone exceeds it
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 16)
    # no budget: sorted chunks of the batch size (evaluation's batches before streaming)
    order = np.argsort(lengths, kind="stable")
    assert [b.tolist() for b in length_batches(lengths, 3)] == [order[i:i + 3].tolist() for i in range(0, 8, 3)]
    assert length_batches([], 4, 10) == []


def test_streamed_probabilities_equal_one_by_one(reader):
    """Batched by seconds (both limits binding), rows asked in shuffled order: the probabilities of an
    unbatched prediction, in the order asked (a layer-norm checkpoint: padding changes nothing)."""
    model = wave_model("layer").eval()
    featurize = model.featurizer()
    rows = shuffled_rows(reader)
    batches = length_batches(reader.lengths[rows], 4, 7.0 * reader.sample_rate)
    sizes = [len(b) for b in batches]
    assert max(sizes) == 4 and min(sizes[:-1]) < 4  # the count cap and the seconds budget both bound a batch
    got = predict_rows(model, featurize, reader, rows, 4, torch.device("cpu"), batch_seconds=7.0)
    alone = np.concatenate([predict_rows(model, featurize, reader, [r], 1, torch.device("cpu")) for r in rows])
    np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)
    assert np.allclose(got.sum(1), 1, atol=1e-5) and np.ptp(got, axis=0).max() > 0.1


def test_same_results_as_before_streaming(reader):
    """Where the seconds budget does not bind, the batches are those of the in-memory prediction (sorted
    chunks of the batch size): identical probabilities, even for a group-norm model, whose output depends
    on the padding."""
    model = wave_model("group").eval()
    featurize = model.featurizer()
    rows = shuffled_rows(reader, 1)
    streamed = predict_rows(model, featurize, reader, rows, 8, torch.device("cpu"))
    in_memory = predict_features(model, [featurize(reader.wave(r)) for r in rows], 8, torch.device("cpu"))
    assert np.array_equal(streamed, in_memory)
    order = np.argsort(reader.lengths[rows], kind="stable")
    with torch.inference_mode():  # evaluation before streaming, written out
        from ser_toolkit.training.data import Collate

        before = np.zeros_like(streamed)
        for start in range(0, len(rows), 8):
            idx = order[start:start + 8]
            x, mask, _, _ = Collate("wave")([(featurize(reader.wave(rows[i])), 0, None) for i in idx])
            before[idx] = torch.softmax(model(x, mask).float(), -1).numpy()
    assert np.array_equal(streamed, before)


class CountingReader:
    """A cache reader that counts the waves read."""

    def __init__(self, reader) -> None:
        self.reader, self.read = reader, 0
        self.lengths, self.sample_rate = reader.lengths, reader.sample_rate

    def wave(self, row: int) -> np.ndarray:
        self.read += 1
        return self.reader.wave(row)


def test_rows_are_read_lazily_one_batch_at_a_time(reader):
    """When the model sees a batch, only that batch's waves have been read beyond those already predicted:
    the set is never held in memory."""
    model = wave_model("group").eval()
    counting = CountingReader(reader)
    seen: list[tuple[int, int]] = []  # (waves read so far, batch size) at each forward
    forward = model.forward

    def recording(inputs, mask=None):
        seen.append((counting.read, inputs.shape[0]))
        return forward(inputs, mask)

    model.forward = recording
    rows = shuffled_rows(reader, 2)
    predict_rows(model, model.featurizer(), counting, rows, 3, torch.device("cpu"), batch_seconds=5.0)
    assert len(seen) >= 5 and sum(n for _, n in seen) == len(rows) == counting.read
    done = 0
    for read, n in seen:
        assert read - done == n <= 3  # in flight: this batch only
        done += n


def test_evaluate_cli_batch_options_change_batching_not_results(tmp_path):
    import json

    from helpers import run_sertk

    cache, run = tmp_path / "cache", tmp_path / "run"
    assert run_sertk("cache", "synthetic", "--set", "per_emotion=2", "--cache-dir", cache, "-q").code == 0
    r = run_sertk("train", "--cache-dir", cache, "--out", run, "--model", "tiny", "--model-set", "hidden_size=16",
                  "--epochs", "1", "--workers", "0", "--split", "speaker:test=0.25", "-q")
    assert r.code == 0, r.err
    default = run_sertk("evaluate", run, "--json")
    assert default.code == 0, default.err
    first = (run / "eval" / "test.predictions.csv").read_text()
    small = run_sertk("evaluate", run, "--json", "--batch-seconds", "1.5", "--batch-size", "2")
    assert small.code == 0, small.err
    assert json.loads(small.out) == json.loads(default.out)
    # tiny is a group-norm HuBERT: its conv statistics include the padding, as HF's do (no attention mask
    # for group-norm checkpoints), so other batches move the probabilities by ~1e-4 and no more
    a, b = _table(first), _table((run / "eval" / "test.predictions.csv").read_text())
    assert a[0] == b[0] and a[1] == b[1], "other batches changed the utterances or the predicted emotions"
    np.testing.assert_allclose(a[2], b[2], atol=1e-3)
    bad = run_sertk("evaluate", run, "--batch-seconds", "0")
    assert bad.code == 2 and "--batch-seconds 0.0 is not above 0" in bad.err and len(bad.err.splitlines()) == 1


def _table(text: str) -> tuple[list[str], list[str], np.ndarray]:
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(text)))
    probs = [[float(v) for k, v in r.items() if k not in ("utterance", "true", "predicted", "speaker")] for r in rows]
    return [r["utterance"] for r in rows], [r["predicted"] for r in rows], np.asarray(probs)
