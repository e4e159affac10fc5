"""Frozen SSL probes on cached features: the ``ssl`` featurizer and ``--model hubert --probe``.

A tiny randomly initialised HuBERT saved with ``save_pretrained`` stands in for
a hub checkpoint, so the real loading path (a local folder) is exercised.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers import one_line_error, synthetic_cache, write_audio
from ser_toolkit.cache.features import FeatureReader, feature_path, load_features
from ser_toolkit.cache.reader import CacheReader
from ser_toolkit.featurizers import get_featurizer

torch = pytest.importorskip("torch")

LAYERS, HIDDEN = 2, 32
FAST = ["--split", "speaker:test=0.34", "--workers", "1", "-q"]


def save_tiny_hubert(path, seed: int):
    """A tiny HuBERT with a 7-way head and its feature extractor, saved like a hub checkpoint."""
    from transformers import HubertConfig, HubertForSequenceClassification, Wav2Vec2FeatureExtractor

    cfg = HubertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64,
                       conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 2), conv_kernel=(10, 8, 4, 4),
                       num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=16,
                       num_labels=7)
    torch.manual_seed(seed)
    model = HubertForSequenceClassification(cfg)
    model.save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                             return_attention_mask=True).save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("cache"), per_emotion=1, speakers=3)


def waves():
    rng = np.random.default_rng(0)
    return [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 5000, 23456, 100)]


def test_features_are_every_layers_mean_pooled_hidden_states(tmp_path):
    model = save_tiny_hubert(tmp_path / "ckpt", seed=0)
    feat = get_featurizer("ssl", {"checkpoint": str(tmp_path / "ckpt"), "device": "cpu"})
    got = feat.extract_many(waves(), 16000)
    for w, x in zip(waves(), got):
        assert x.shape == (LAYERS + 1, HIDDEN) and x.dtype == np.float32
        z = (w - w.mean()) / np.sqrt(w.var() + 1e-7)  # the extractor's do_normalize
        z = np.pad(z, (0, max(0, 345 - z.size)))  # shorter than the tiny encoder's receptive field: padded
        with torch.inference_mode():
            hidden = model.hubert(torch.from_numpy(z)[None], output_hidden_states=True).hidden_states
        np.testing.assert_allclose(x, torch.stack([h[0].mean(0) for h in hidden]).numpy(), atol=1e-6)
    np.testing.assert_array_equal(feat.extract(waves()[1], 16000), got[1])  # no dependence on the batch
    import pickle

    again = pickle.loads(pickle.dumps(feat))  # without the loaded model
    assert again._model is None and np.array_equal(again.extract(waves()[0], 16000), got[0])
    assert "checkpoint_sha256" in feat.identity()["options"] and str(tmp_path) not in json.dumps(feat.identity())


def test_cached_probe_equals_the_uncached_probe(tmp_path):
    from ser_toolkit.plugins.hubert import Hubert, Tiny, _wrap

    save_tiny_hubert(tmp_path / "ckpt", seed=0)
    plugin = Hubert(checkpoint=str(tmp_path / "ckpt"), probe=True)
    assert plugin.featurizer_spec() == ("ssl", {"checkpoint": str(tmp_path / "ckpt")})
    hf, extractor = plugin._load(str(tmp_path / "ckpt"), 7)
    old = _wrap(hf, extractor, probe=True).eval()  # the uncached probe: the encoder on every batch
    cached = plugin.build(7).eval()
    assert cached.input_kind == "vector" and cached.featurizer() is None
    assert sum(p.numel() for p in cached.parameters()) == (LAYERS + 1) + HIDDEN * 16 + 16 + 16 * 7 + 7  # no encoder
    with torch.no_grad():
        old.layer_weights.copy_(torch.tensor([0.3, -1.0, 0.8]))
        cached.layer_weights.copy_(old.layer_weights)
    feats = get_featurizer("ssl", {"checkpoint": str(tmp_path / "ckpt")}).extract_many(waves(), 16000)
    normalize = old.featurizer()
    with torch.inference_mode():
        got = cached(torch.as_tensor(np.stack(feats)))
        for k, w in enumerate(waves()[:3]):  # unpadded, one at a time (padding changes group-norm encoders)
            want = old(torch.from_numpy(normalize(w))[None])
            torch.testing.assert_close(got[k:k + 1], want, atol=1e-5, rtol=1e-5)
    assert Tiny(probe=True).featurizer_spec() is None  # tiny's probe stays uncached (see the module doc)
    assert Tiny(probe=True, layers=1, hidden_size=16).build(7).input_kind == "wave"


def test_feature_cache_hit_and_other_weights(cache_dir, tmp_path, cli):
    ckpt = tmp_path / "ckpt"
    save_tiny_hubert(ckpt, seed=0)
    args = ["features", "synthetic", "--cache-dir", cache_dir, "--featurizer", "ssl", "--set",
            f"checkpoint={ckpt}", "--json"]
    r = cli(*args)
    assert r.code == 0, r.err
    first = json.loads(r.out)
    n = len(CacheReader(cache_dir / "synthetic.h5"))
    assert first["shape"] == [LAYERS + 1, HIDDEN] and first["computed"] == n and not first["unchanged"]
    r = cli(*args)
    second = json.loads(r.out)
    assert second["unchanged"] and second["computed"] == 0 and second["digest"] == first["digest"]
    fr = load_features(CacheReader(cache_dir / "synthetic.h5"), get_featurizer("ssl", {"checkpoint": str(ckpt)}))
    assert fr.hit and fr.features.shape == (n, LAYERS + 1, HIDDEN)  # a hit: nothing computed
    save_tiny_hubert(ckpt, seed=1)  # other weights, same folder
    third = json.loads(cli(*args).out)
    assert third["path"] != first["path"] and third["computed"] == n and third["digest"] != first["digest"]
    assert FeatureReader(first["path"]).digest == first["digest"]  # the first checkpoint's features are kept


def test_unreachable_checkpoint_is_one_line(cache_dir, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["features", "synthetic", "--cache-dir", cache_dir, "--featurizer", "ssl", "--set"]
    one_line_error(cli(*base, "checkpoint=nobody/no-such-ssl-model"), "not in the local Hugging Face cache")
    one_line_error(cli(*base, f"checkpoint={tmp_path / 'missing'}"), "does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    one_line_error(cli(*base, f"checkpoint={tmp_path / 'empty'}"), "holds no weights")


def test_probe_trains_evaluates_and_predicts_on_cached_normalised_features(cache_dir, tmp_path, cli):
    ckpt = tmp_path / "ckpt"
    save_tiny_hubert(ckpt, seed=0)
    run = tmp_path / "run"
    train = ["train", "--cache-dir", cache_dir, "--out", run, "--model", "hubert", "--model-set",
             f"checkpoint={ckpt}", "--probe", "--normalize", "speaker", "--epochs", "2", "--lr", "1e-2",
             "--valid", "0.2", *FAST]
    r = cli(*train)
    assert r.code == 0, r.err
    reader = CacheReader(cache_dir / "synthetic.h5")
    path = feature_path(reader, get_featurizer("ssl", {"checkpoint": str(ckpt)}))
    fr = FeatureReader(path)  # the same weights as another test's: content-addressed, maybe computed there
    info = json.loads((run / "run.json").read_text())
    assert info["data"]["features"] == [{"set": str(cache_dir / "synthetic.h5"), "digest": fr.digest}]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["parameters"]["total"] < 1000 and "valid_uar" in summary["history"][-1]
    assert json.loads((run / "model" / "probe.json").read_text())["checkpoint_sha256"] in fr._identity_json
    mtime = path.stat().st_mtime_ns
    r = cli("evaluate", run, "--json")
    assert r.code == 0, r.err
    e = json.loads((run / "eval" / "test.json").read_text())
    assert e["data"]["features"]["features"] == fr.digest and e["data"]["features"]["normalize"] == "speaker"
    assert path.stat().st_mtime_ns == mtime  # evaluation reads the cache: no encoder pass again
    audio = [write_audio(tmp_path / f"f{k}.wav", 0.6, freq=150 + 40 * k) for k in range(5)]
    r = cli("predict", run, *audio, "--json")
    assert r.code == 0, r.err
    assert all(abs(sum(o["probabilities"].values()) - 1) < 1e-4 for o in json.loads(r.out))
    # the probe needs the encoder it was trained on: other weights in the folder are refused
    shutil.copytree(ckpt, tmp_path / "kept")
    save_tiny_hubert(ckpt, seed=1)
    one_line_error(cli("evaluate", run), "changed since run")
    assert "already finished" in cli(*train, "--resume").out  # a finished run has nothing left to train
    (run / "final.json").unlink()  # an unfinished one continues on the encoder it was trained on only
    one_line_error(cli(*train, "--resume"), "changed since run")
    assert json.loads((run / "model" / "probe.json").read_text())["checkpoint_sha256"] in fr._identity_json
    # features are of whole utterances, computed once: no online augmentation, no crops
    one_line_error(cli("train", "--cache-dir", cache_dir, "--out", tmp_path / "online", "--model", "hubert",
                       "--model-set", f"checkpoint={tmp_path / 'kept'}", "--probe", "--plugins", "noise",
                       "--epochs", "1", *FAST), "trains on cached features only", "--aug-mode offline")
