"""Runs trained from Hugging Face checkpoints as the hub ships them: evaluate, predict, resume, re-head.

Every HF speech checkpoint ships ``mask_time_prob > 0`` (so it has a ``masked_spec_embed``) and
``layerdrop > 0``; the reference one also a weighted layer sum. sertk trains without HF's masking and layerdrop
unless asked, and the run must rebuild exactly the module it trained.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import one_line_error, run_sertk, synthetic_cache, write_audio

torch = pytest.importorskip("torch")

ARGS = ["--epochs", "2", "--batch-size", "8", "--workers", "0", "--split", "speaker:test=0.25", "-q"]


def save_checkpoint(path, **config):
    """A tiny HubertForSequenceClassification with HubertConfig's defaults (mask_time_prob 0.05, layerdrop 0.1,
    4 labels) unless ``config`` says otherwise, saved with save_pretrained like a hub checkpoint."""
    from transformers import HubertConfig, HubertForSequenceClassification, Wav2Vec2FeatureExtractor

    cfg = HubertConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 conv_dim=(16,) * 4, conv_stride=(5, 4, 4, 2), conv_kernel=(10, 8, 4, 4),
                                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                                 classifier_proj_size=16, num_labels=4), **config})
    torch.manual_seed(0)
    HubertForSequenceClassification(cfg).save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                             return_attention_mask=True).save_pretrained(path)
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("cache"), speakers=4, per_emotion=2) / "synthetic.h5"


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_default_config_checkpoint_trains_evaluates_predicts_and_resumes(cache, tmp_path):
    folder = tmp_path / "hf"
    shipped = save_checkpoint(folder)
    assert shipped.mask_time_prob > 0 and shipped.layerdrop > 0  # as every hub checkpoint
    ref = tmp_path / "ref"
    r = run_sertk("train", "--model", folder, "--dataset", cache, "--out", ref, *ARGS)
    assert r.code == 0, r.err
    r = run_sertk("evaluate", ref, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["test"]["n"] > 0
    write_audio(tmp_path / "a.wav", 1.0)
    r = run_sertk("predict", ref, tmp_path / "a.wav", "--json")
    assert r.code == 0, r.err
    assert abs(sum(json.loads(r.out)[0]["probabilities"].values()) - 1) < 1e-4
    # interrupted after its first epoch (SIGTERM, as Slurm sends), resumed: the same weights
    run = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "ser_toolkit", "train", "--model", str(folder), "--dataset",
                             str(cache), "--out", str(run), *ARGS], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run / "curves.csv").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    if proc.returncode == 0:  # the run finished before the signal: nothing to resume, it is the same run
        pytest.skip("the run ended before SIGTERM arrived")
    assert proc.returncode == 128 + signal.SIGTERM and "--resume" in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-001.pt"]
    r = run_sertk("train", "--out", run, "--resume", "-q", "--workers", "0")
    assert r.code == 0, r.err
    a, b = weights(ref / "checkpoints" / "best.safetensors"), weights(run / "checkpoints" / "best.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "hf.hubert.masked_spec_embed" in a  # kept (frozen) in the weights, rebuilt with the module
    assert run_sertk("evaluate", run).code == 0


def test_layerdrop_on_a_weighted_layer_sum_checkpoint(cache, tmp_path):
    folder = tmp_path / "hf"
    save_checkpoint(folder, use_weighted_layer_sum=True)
    run = tmp_path / "run"
    r = run_sertk("train", "--model", folder, "--model-set", "layerdrop=0.5", "--dataset", cache, "--out", run,
                  *ARGS)
    assert r.code == 0, r.err
    assert json.loads((run / "config.json").read_text())["train"]["model_options"]["layerdrop"] == 0.5
    r = run_sertk("evaluate", run, "--json")
    assert r.code == 0, r.err


def test_a_skipped_layer_passes_its_input_on(tmp_path):
    """Every layer has a state for the weighted sum, whichever layers layerdrop skips."""
    from ser_toolkit.plugins.hubert import Hubert, encode

    folder = tmp_path / "hf"
    save_checkpoint(folder, use_weighted_layer_sum=True, num_hidden_layers=3)
    model = Hubert(checkpoint=str(folder), layerdrop=1.0).build(7)  # every layer skipped while training
    model.train()
    x = torch.randn(2, 8000)
    hidden, _, states = encode(model.hf, x, torch.ones(2, 8000, dtype=torch.long), hidden_states=True)
    assert len(states) == 4 and all(torch.equal(s, states[0]) for s in states)
    assert model(x).shape == (2, 7)
    model.eval()  # no layerdrop: the layers act
    _, _, states = encode(model.hf, x, hidden_states=True)
    assert len(states) == 4 and not torch.equal(states[1], states[0])


def test_weights_that_do_not_fit_name_the_tensors(cache, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "hf"
    save_checkpoint(folder)
    run = tmp_path / "run"
    assert run_sertk("train", "--model", folder, "--dataset", cache, "--out", run, *ARGS, "--epochs", "1").code == 0
    best = run / "checkpoints" / "best.safetensors"
    from safetensors import safe_open

    with safe_open(str(best), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(best))
    tensors.pop("hf.hubert.masked_spec_embed")
    tensors["hf.extra.weight"] = torch.zeros(2)
    tensors["hf.classifier.weight"] = torch.zeros(3, 16)
    save_file(tensors, str(best), metadata=meta)
    from ser_toolkit.errors import SertkError
    from ser_toolkit.evaluation import load_run_model

    with pytest.raises(SertkError) as err:
        load_run_model(run, info=json.loads((run / "run.json").read_text()))
    text = str(err.value)
    assert "missing hf.hubert.masked_spec_embed" in text and "unexpected hf.extra.weight" in text
    assert "hf.classifier.weight 3x16 in the file, 7x16 in the model" in text
    # the sealed run refuses the changed file before loading it, in one line
    one_line_error(run_sertk("evaluate", run), "is not the file this run sealed")


@pytest.mark.slow
def test_hubert_large_shaped_model_trains_and_evaluates(tmp_path):
    """superb/hubert-large-superb-er's architecture and shipped options (random weights, no download):
    a few steps on CPU, then evaluate (the rebuilt module takes the trained weights) and predict."""
    from transformers import HubertConfig, HubertForSequenceClassification, Wav2Vec2FeatureExtractor

    folder = tmp_path / "large"
    cfg = HubertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                       classifier_proj_size=256, num_labels=4, use_weighted_layer_sum=True, mask_time_prob=0.05,
                       layerdrop=0.1)
    with torch.device("meta"):  # the architecture; weights drawn cheaply below (their values do not matter)
        model = HubertForSequenceClassification(cfg)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    assert sum(p.numel() for p in model.parameters()) > 300_000_000
    model.save_pretrained(folder)
    del model
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)
    cache = synthetic_cache(tmp_path / "cache", speakers=2, per_emotion=1) / "synthetic.h5"
    from ser_toolkit.cache.reader import CacheReader

    reader = CacheReader(cache)
    short = sorted(range(len(reader)), key=lambda i: reader.lengths[i])[:6]
    parts = dict(zip((reader.ids[i] for i in short), ["train"] * 4 + ["test"] * 2))
    split = tmp_path / "split.csv"
    split.write_text("utterance,split\n" + "".join(f"{u},{parts.get(u, 'unused')}\n" for u in reader.ids))
    run = tmp_path / "run"
    r = run_sertk("train", "--model", folder, "--dataset", cache, "--split", f"file:{split}", "--out", run,
                  "--epochs", "1", "--batch-size", "2", "--max-seconds", "1", "--workers", "0", "-q", timeout=900)
    assert r.code == 0, r.err
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["parameters"]["total"] > 300_000_000 and len(summary["history"]) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.safetensors"]
    r = run_sertk("evaluate", run, "--json", timeout=900)
    assert r.code == 0, r.err
    assert json.loads(r.out)["test"]["n"] == 2
    write_audio(tmp_path / "a.wav", 0.5)
    r = run_sertk("predict", run, tmp_path / "a.wav", "--json", timeout=900)
    assert r.code == 0, r.err
    probs = np.array(list(json.loads(r.out)[0]["probabilities"].values()))
    assert probs.shape == (7,) and abs(probs.sum() - 1) < 1e-4
