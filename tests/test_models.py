"""Model plugins: a local 4-label HF checkpoint re-headed to 7, the offline message, probe, acoustic features."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from ser_toolkit.errors import SertkError

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def four_label_checkpoint(tmp_path_factory):
    """A tiny randomly initialised HuBERT with a 4-way head, saved like a hub checkpoint."""
    from transformers import HubertConfig, HubertForSequenceClassification, Wav2Vec2FeatureExtractor

    path = tmp_path_factory.mktemp("ckpt") / "hubert-4"
    cfg = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 2), conv_kernel=(10, 8, 4, 4),
                       num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=16,
                       num_labels=4, id2label={0: "neu", 1: "hap", 2: "ang", 3: "sad"},
                       label2id={"neu": 0, "hap": 1, "ang": 2, "sad": 3})
    torch.manual_seed(0)
    HubertForSequenceClassification(cfg).save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                             return_attention_mask=True).save_pretrained(path)
    return path


def test_local_checkpoint_gets_a_seven_way_head(four_label_checkpoint, tmp_path):
    from ser_toolkit.plugins.hubert import Hubert

    model = Hubert(checkpoint=str(four_label_checkpoint)).build(7, tmp_path)
    x = torch.randn(2, 8000)
    assert model(x, torch.ones(2, 8000, dtype=torch.long)).shape == (2, 7)
    assert model.hf.config.id2label[6] == "surprise"
    # the encoder weights are the checkpoint's, only the head is new
    from transformers import HubertForSequenceClassification

    original = HubertForSequenceClassification.from_pretrained(four_label_checkpoint)
    assert torch.equal(original.hubert.encoder.layers[0].attention.q_proj.weight,
                       model.hf.hubert.encoder.layers[0].attention.q_proj.weight)
    rebuilt = Hubert(checkpoint=str(four_label_checkpoint)).rebuild(7, tmp_path)  # offline, from the run folder
    assert rebuilt(x).shape == (2, 7)
    norm = model.featurizer()(np.array([1.0, 2.0, 3.0], np.float32))
    assert abs(norm.mean()) < 1e-6 and abs(norm.std() - 1) < 1e-3


def test_checkpoint_masking_and_layerdrop_are_off_unless_asked(four_label_checkpoint, tmp_path):
    """The checkpoint ships HF's SpecAugment (mask_time_prob 0.05) and layerdrop 0.1; sertk trains without them
    unless its options ask, so the specaugment arm is the only masking."""
    from transformers import HubertConfig

    from ser_toolkit.plugins.hubert import Hubert

    shipped = HubertConfig.from_pretrained(four_label_checkpoint)
    assert shipped.mask_time_prob > 0 and shipped.layerdrop > 0
    x = torch.randn(2, 16000)

    def train_outputs(model):
        model.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, torch.nn.Dropout) else None)
        model.train()
        outs = []
        for seed in range(3):
            torch.manual_seed(seed)
            outs.append(model(x).detach())
        model.eval()
        return outs, model(x).detach()

    default = Hubert(checkpoint=str(four_label_checkpoint)).build(7, tmp_path / "a")
    outs, clean = train_outputs(default)
    assert all(torch.allclose(o, clean, atol=1e-5) for o in outs)  # training forward == eval forward
    saved = HubertConfig.from_pretrained(tmp_path / "a" / "model")  # the checkpoint's description: its modules
    assert saved.mask_time_prob == shipped.mask_time_prob and saved.layerdrop == shipped.layerdrop
    rebuilt = Hubert(checkpoint=str(four_label_checkpoint)).rebuild(7, tmp_path / "a")  # sertk's options again
    assert rebuilt.hf.config.mask_time_prob == 0 and rebuilt.hf.config.layerdrop == 0
    assert not rebuilt.hf.config.apply_spec_augment
    assert rebuilt.state_dict().keys() == default.state_dict().keys()  # the trained module, masked_spec_embed too
    assert not default.hf.hubert.masked_spec_embed.requires_grad
    asked = Hubert(checkpoint=str(four_label_checkpoint), mask_time_prob=0.5, layerdrop=0.5).build(7, tmp_path / "b")
    outs, _ = train_outputs(asked)
    assert not all(torch.allclose(o, outs[0], atol=1e-5) for o in outs[1:])


def test_probe_freezes_the_encoder(four_label_checkpoint, tmp_path):
    """The cached probe trains only a head on the pooled layers; the encoder is not part of the model."""
    from ser_toolkit.plugins.hubert import Hubert, Tiny

    plugin = Hubert(checkpoint=str(four_label_checkpoint), probe=True)
    assert plugin.featurizer_spec()[0] == "ssl"
    model = plugin.build(7, tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "layer_weights" in trainable and not any(n.startswith("hf.") for n in trainable)
    out = model(torch.randn(2, 3, 32))  # (batch, layers + 1, hidden) pooled states from the feature cache
    assert out.shape == (2, 7)
    out.sum().backward()
    assert model.layer_weights.grad is not None
    # tiny (weights drawn in memory, no checkpoint to digest) keeps the uncached probe on waves
    tiny = Tiny(probe=True).build(7)
    assert "layer_weights" in {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert tiny(torch.randn(2, 8000), torch.ones(2, 8000, dtype=torch.long)).shape == (2, 7)


def test_offline_missing_model_is_one_line_and_quick(tmp_path):
    cache = subprocess.run([sys.executable, "-m", "ser_toolkit", "cache", "synthetic", "--set", "per_emotion=1",
                            "-q"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert cache.returncode == 0, cache.stderr
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "ser_toolkit", "train", "--model", "superb/hubert-large-superb-er",
                        "--epochs", "1"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "not in the local Hugging Face cache" in r.stderr and "/path/to/folder" in r.stderr
    assert time.monotonic() - t < 60  # never hangs on retries


def test_bad_model_folders(tmp_path):
    from ser_toolkit.plugins.hubert import Hubert

    (tmp_path / "empty").mkdir()
    with pytest.raises(SertkError, match="has no config.json"):
        Hubert(checkpoint=str(tmp_path / "empty")).build(7)
    with pytest.raises(SertkError, match="does not exist"):
        Hubert(checkpoint="./nowhere/model").build(7)


def test_acoustic_features_and_head():
    from ser_toolkit.plugins.acoustic import N_FEATURES, Acoustic, acoustic_features
    from ser_toolkit.testing import speechlike

    feats = [acoustic_features(speechlike(s, seed=i)) for i, s in enumerate((0.01, 0.5, 2.0))]
    assert all(f.shape == (N_FEATURES,) and np.isfinite(f).all() for f in feats)
    model = Acoustic(hidden=0).build(7)
    model.prepare(feats)
    assert model(torch.as_tensor(np.stack(feats))).shape == (3, 7)
