"""Host-device syncs (a ``TorchDispatchMode`` probe, counted on CPU as a proxy) and sertk's own HuBERT pooling.

sertk runs the checkpoint's encoder itself (:func:`ser_toolkit.plugins.hubert.encode`) and pools with a
multiply-and-sum masked mean, so a training step has no data-dependent sync; Hugging Face's
``HubertForSequenceClassification`` zeroes padded frames by boolean-mask assignment (twice) and checks
``mask.all()``. Real tiny random HuBERTs, padded batches of unequal lengths.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ser_toolkit.training.syncs import SyncCounter, count_train_step

MAX_SYNCS_PER_STEP = 1
LENGTHS = (16000, 11000, 5000)


def tiny_config(norm: str, **extra):
    from transformers import HubertConfig

    return HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 2), conv_kernel=(10, 8, 4, 4),
                        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=16,
                        num_labels=7, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer",
                        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                        final_dropout=0.0, **extra)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random HuBERTs saved like hub checkpoints: ``group`` (hubert-base style) and ``layer`` (layer norm,
    stable layer norm: hubert-large, superb/hubert-large-superb-er style)."""
    from transformers import HubertForSequenceClassification, Wav2Vec2FeatureExtractor

    out = {}
    for norm in ("group", "layer"):
        out[norm] = path = tmp_path_factory.mktemp("ckpt") / norm
        torch.manual_seed(0)
        HubertForSequenceClassification(tiny_config(norm)).save_pretrained(path)
        Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                                 return_attention_mask=norm == "layer").save_pretrained(path)
    return out


@pytest.fixture(params=["group", "layer"])
def checkpoint(request, checkpoints):
    return checkpoints[request.param]


def padded_batch(seed: int = 0, lengths=LENGTHS):
    """Zero-padded waves of unequal lengths, their attention mask and labels."""
    rng = np.random.default_rng(seed)
    x = torch.zeros(len(lengths), max(lengths))
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        mask[i, :n] = 1
    return x, mask, torch.arange(len(lengths))


def sertk_model(path):
    from ser_toolkit.plugins.hubert import Hubert

    return Hubert(checkpoint=str(path)).build(7)


class HFPath(torch.nn.Module):
    """The reference: HF's sequence classifier given the attention mask."""

    def __init__(self, hf) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, inputs, attention_mask=None):
        return self.hf(input_values=inputs, attention_mask=attention_mask).logits


def test_counter_counts_what_syncs_and_nothing_else():
    x = torch.randn(6)
    with SyncCounter("cpu") as c:
        y = x * 2 + 1
        torch.where(x > 0, x, 0.0)
        torch.repeat_interleave(x, torch.tensor([1, 2, 0, 1, 1, 1]), output_size=6)
        y.sum()
    assert c.total == 0, dict(c.by_kind)
    with SyncCounter("cpu") as c:
        x.sum().item()
        bool(x[0] > 0)
        x.nonzero()
        x[x > 0]
        x[x < 0] = 0.0
        torch.masked_select(x, x > 0)
        torch.unique(x)
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.equal(x, x)
        x.numpy()
        x.tolist()
    assert c.by_kind == {"scalar read (item/bool/int/float)": 2, "nonzero": 1, "boolean-mask indexing": 2,
                         "masked_select": 1, "unique": 1, "repeat_interleave": 1, "equal": 1,
                         "to host (numpy)": 1, "to host (tolist)": 1}, dict(c.by_kind)
    assert x.numpy is not None and "counted" not in repr(torch.Tensor.numpy)  # unpatched on exit
    with SyncCounter("cuda") as c:  # on a GPU run CPU tensors are the host's: nothing waits
        x.sum().item()
        x[x > 0]
    assert c.total == 0


def test_training_step_has_at_most_one_sync(checkpoint):
    """Forward + backward + optimizer step of a padded batch of unequal lengths; HF's path, measured the
    same way, syncs several times a step (the probe sees them)."""
    from transformers import HubertForSequenceClassification

    x, mask, labels = padded_batch()
    ours = count_train_step(sertk_model(checkpoint), x, mask, labels, steps=2)
    assert ours.total / 2 <= MAX_SYNCS_PER_STEP, dict(ours.by_kind)
    hf = HubertForSequenceClassification.from_pretrained(checkpoint)
    reference = count_train_step(HFPath(hf), x, mask, labels, steps=2)
    assert reference.total / 2 >= 3 and reference.by_kind["boolean-mask indexing"] >= 4, dict(reference.by_kind)


def test_probe_and_gradient_checkpointing_steps_have_no_sync():
    from ser_toolkit.plugins.hubert import Tiny

    x, mask, labels = padded_batch(1)
    for model in (Tiny(probe=True, hidden_size=16).build(7), Tiny(gradient_checkpointing=True, hidden_size=16).build(7)):
        counted = count_train_step(model, x, mask, labels, steps=1)
        assert counted.total <= MAX_SYNCS_PER_STEP, dict(counted.by_kind)


def test_frame_mask_is_hf_s_without_a_sync(checkpoint):
    from transformers import HubertForSequenceClassification

    from ser_toolkit.plugins.hubert import frame_mask

    hf = HubertForSequenceClassification.from_pretrained(checkpoint)
    lengths = torch.tensor([400, 401, 719, 720, 1600, 5000, 15999, 16000])
    mask = (torch.arange(16000) < lengths[:, None]).long()
    frames = int(hf._get_feat_extract_output_lengths(16000))
    with SyncCounter("cpu") as c:
        ours = frame_mask(hf, mask, frames)
    assert c.total == 0
    assert torch.equal(ours, hf._get_feature_vector_attention_mask(frames, mask))


def test_pooled_logits_equal_hf_layer_norm(checkpoints):
    """Layer-norm checkpoints take the mask: sertk's logits are HF's (padded batch), and a padded utterance
    gets the logits it gets alone; gradients agree too."""
    checkpoint = checkpoints["layer"]
    from transformers import HubertForSequenceClassification

    from ser_toolkit.plugins.hubert import uses_attention_mask

    ours = sertk_model(checkpoint).eval()
    hf = HubertForSequenceClassification.from_pretrained(checkpoint, num_labels=7, ignore_mismatched_sizes=True)
    hf.load_state_dict({k[3:]: v for k, v in ours.state_dict().items()})  # the same (re-headed) weights
    hf.eval()
    assert uses_attention_mask(hf.config)
    x, mask, labels = padded_batch(2)
    with torch.no_grad():
        got = ours(x, mask)
        torch.testing.assert_close(got, hf(input_values=x, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), hf(input_values=x).logits, atol=1e-5, rtol=1e-5)  # no mask: plain mean
        for i, n in enumerate(LENGTHS):
            alone = ours(x[i:i + 1, :n], mask[i:i + 1, :n])
            torch.testing.assert_close(got[i:i + 1], alone, atol=1e-4, rtol=1e-4)
    for model, logits in ((ours, lambda: ours(x, mask)), (hf, lambda: hf(input_values=x, attention_mask=mask).logits)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(logits(), labels).backward()
    ours_grads = dict(ours.hf.named_parameters())
    for name, p in hf.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours_grads[name].grad, p.grad, atol=1e-5, rtol=1e-4)


def test_group_norm_checkpoints_get_no_attention_mask(checkpoints):
    """HF: group-norm encoders must not be given the attention mask (zero padding instead). sertk's encoder
    sees none; the mean is still over the frames of real audio."""
    checkpoint = checkpoints["group"]
    from ser_toolkit.plugins.hubert import frame_mask, masked_mean, uses_attention_mask

    ours = sertk_model(checkpoint).eval()
    hf = ours.hf
    assert not uses_attention_mask(hf.config)
    x, mask, _ = padded_batch(3)
    with torch.no_grad():
        got = ours(x, mask)
        hidden = hf.hubert(input_values=x).last_hidden_state  # no mask
        want = hf.classifier(masked_mean(hf.projector(hidden), frame_mask(hf, mask, hidden.shape[1])))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        masked = hf.hubert(input_values=x, attention_mask=mask).last_hidden_state
        assert not torch.allclose(hidden, masked, atol=1e-3)  # the mask would have changed the encoder


def test_weighted_layer_sum_checkpoints_match_hf(tmp_path):
    """Checkpoints with ``use_weighted_layer_sum`` pool their own weighted sum of layers, as HF does."""
    from transformers import HubertForSequenceClassification

    from ser_toolkit.plugins.hubert import _wrap

    torch.manual_seed(4)
    hf = HubertForSequenceClassification(tiny_config("layer", use_weighted_layer_sum=True)).eval()
    with torch.no_grad():
        hf.layer_weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x, mask, _ = padded_batch(4)
    with torch.no_grad():
        torch.testing.assert_close(_wrap(hf, None, probe=False).eval()(x, mask),
                                   hf(input_values=x, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
