"""``hubert`` and ``tiny``: Hugging Face self-supervised speech models for sequence classification.

``hubert`` loads any checkpoint usable with ``AutoModelForAudioClassification``
(HuBERT, wav2vec 2.0, WavLM, data2vec-audio) from a hub id or a local
directory; the classification head is replaced when its label count differs
(4 -> 7 for ``superb/hubert-large-superb-er``, as the reference study did), and
the checkpoint's own feature extractor normalisation is applied. Without
network access an id that is not in the local Hugging Face cache fails at once
with one line asking for a local directory.

The forward is sertk's own (:func:`encode`, :func:`masked_mean`), on the
checkpoint's modules and weights (same state-dict keys): no data-dependent
host-device sync (HF's pooling and encoder zero padded frames by boolean-mask
assignment), logits equal to HF's. Group-norm checkpoints
(``feat_extract_norm == "group"``) get no attention mask, as HF prescribes
(:func:`uses_attention_mask`); the mean covers the frames of real audio.

``probe=true`` freezes the encoder and classifies from a learnable weighted sum
of all hidden layers (SUPERB style). ``hubert`` probes read every layer's
mean-pooled hidden states from the feature cache (the ``ssl`` featurizer,
:mod:`ser_toolkit.plugins.ssl_features`): the encoder runs once per utterance,
ever, and ``--normalize`` applies. The probe's forward (softmax layer weights,
weighted sum, the checkpoint's ``projector``, ``classifier``) equals the
uncached one on unpadded input, since the projector and mean pooling are
linear. Its run holds only the head; evaluation and prediction need the same
checkpoint again (``RUN/model/probe.json`` records its digest; other weights
are refused). Augmentation is materialised (``--aug-mode offline``) and
``--max-seconds`` does not apply.

``tiny`` is a small randomly initialised HuBERT built from a config, for
offline demos and tests. Its probe stays uncached (the encoder runs on every
batch): its weights exist only in memory, drawn again from the seed at every
build, so there is no checkpoint whose digest could key a feature cache (and
another torch or transformers release may draw other weights from the same
seed). To cache a tiny probe, save the model (``save_pretrained``) and train
``--model hubert --model-set checkpoint=FOLDER --probe``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from ser_toolkit import hookimpl
from ser_toolkit.atomic import write_text
from ser_toolkit.emotions import EMOTIONS
from ser_toolkit.errors import SertkError
from ser_toolkit.models import ModelPlugin, SerModelMixin
from ser_toolkit.params import Param

REFERENCE_CHECKPOINT = "superb/hubert-large-superb-er"
PROBE_FILE = "probe.json"
"""In ``RUN/model``: the checkpoint a cached probe was trained on and the digest of its files."""


HF_REGULARISERS = (
    Param("mask_time_prob", 0.0, "the model's own SpecAugment: share of frames masked in time while training "
          "(checkpoints ship 0.05; off by default so the specaugment plugin is the only masking)", type="float",
          min=0.0, max=1.0),
    Param("mask_feature_prob", 0.0, "the model's own SpecAugment along features while training", type="float",
          min=0.0, max=1.0),
    Param("layerdrop", 0.0, "probability of skipping a transformer layer while training (checkpoints ship 0.1)",
          type="float", min=0.0, max=1.0),
)
"""Hugging Face's built-in training-time augmentation: set from these options (recorded with the run), never
inherited silently from a checkpoint's config, so a study's ``specaugment`` arm is not confounded."""


def empty_module(make):
    """``make()``'s module with uninitialised tensors, for weights that are loaded next: built on the meta device
    and given memory without computing any initialisation (for HuBERT-Large, seconds of random init saved).
    A module with non-persistent buffers (which no weights file holds) is built normally."""
    import torch

    with torch.device("meta"):
        module = make()
    if any(name not in module.state_dict() for name, _ in module.named_buffers()):
        return make()
    return module.to_empty(device="cpu")


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_checkpoint(source: str):
    """Load (config, feature extractor kwargs) sources: a local dir, the HF cache, or the hub."""
    from transformers import AutoConfig

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SertkError(f"model folder {path} has no config.json", "pass a folder saved with save_pretrained()")
        return str(path), {}
    if path.suffix or source.startswith((".", "/", "~")):
        raise SertkError(f"model folder {source} does not exist", "check the --model path")
    try:
        AutoConfig.from_pretrained(source, local_files_only=True)
        return source, {"local_files_only": True}
    except OSError:
        pass
    if not hub_reachable():
        raise SertkError(f"model '{source}' is not in the local Hugging Face cache and the hub cannot be reached",
                         "download it where there is network (save_pretrained) and pass --model /path/to/folder")
    return source, {}


class Normalize:
    """The checkpoint's input normalisation (zero mean, unit variance per utterance); picklable."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return wave
        return ((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)).astype(np.float32)


def uses_attention_mask(config) -> bool:
    """Whether the encoder takes the attention mask. Hugging Face: checkpoints with a group-norm feature
    encoder (``feat_extract_norm == "group"``: hubert-base, wav2vec2-base) were trained without one and must get
    zero-padded input and no mask; layer-norm ones (hubert-large, superb/hubert-large-superb-er) take it."""
    return getattr(config, "feat_extract_norm", "layer") != "group"


def frame_mask(hf_model, attention_mask, frames: int):
    """(B, frames) bool: the encoder frames of real audio, by arithmetic on the input lengths (the conv
    kernels and strides); no data-dependent op. Every utterance keeps at least its first frame."""
    import torch

    lengths = hf_model._get_feat_extract_output_lengths(attention_mask.sum(-1))
    return torch.arange(frames, device=attention_mask.device) < lengths.clamp(min=1)[:, None]


def masked_mean(hidden, mask):
    """Mean over time of (B, T, H) hidden states over the frames of ``mask`` (all frames when None), by
    multiply-and-sum: no boolean indexing, so no host-device sync."""
    if mask is None:
        return hidden.mean(1)
    weights = mask.to(hidden.dtype)
    return (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)


_ENCODERS = {f"{arch}Encoder{kind}" for arch in ("Hubert", "Wav2Vec2", "Data2VecAudio")
             for kind in ("", "StableLayerNorm")}
"""Encoders whose forward :func:`encode` replays from their own modules (the same weights and state-dict
keys); other architectures (WavLM...) run Hugging Face's forward."""


def min_samples(config) -> int:
    """The receptive field of the convolutional feature encoder in samples: the shortest input that gives one
    frame (400 for HuBERT and wav2vec 2.0)."""
    field, hop = 1, 1
    for kernel, stride in zip(getattr(config, "conv_kernel", ()), getattr(config, "conv_stride", ())):
        field += (kernel - 1) * hop
        hop *= stride
    return field


def encode(hf_model, inputs, attention_mask=None, hidden_states: bool = False):
    """The base model's forward without data-dependent syncs: (last hidden state (B, T, H), frame mask
    (B, T) bool or None, every layer's hidden states as Hugging Face returns them when ``hidden_states``:
    the input of the first layer, then each layer's output, ``num_hidden_layers + 1`` in all; a layer that
    layerdrop skips outputs its input).

    The same computation as ``hf_model.base_model(inputs, attention_mask)``, except that padded frames are
    zeroed with ``torch.where`` (HF: boolean-mask assignment, a sync), the attention mask is always
    materialised (HF checks ``mask.all()``, a sync) and group-norm checkpoints get no mask
    (:func:`uses_attention_mask`). HF's own SpecAugment (``mask_time_prob``, off by default) still syncs.
    """
    import torch
    from transformers.masking_utils import create_bidirectional_mask

    base, config = hf_model.base_model, hf_model.config
    short = min_samples(config) - inputs.shape[-1]
    if short > 0:  # shorter than one frame's receptive field (400 samples: 25 ms): zero-padded to one frame
        inputs = torch.nn.functional.pad(inputs, (0, short))
        if attention_mask is not None:
            attention_mask = torch.nn.functional.pad(attention_mask, (0, short))
    encoder = getattr(base, "encoder", None)
    give_mask = attention_mask is not None and uses_attention_mask(config)
    if type(encoder).__name__ not in _ENCODERS or getattr(base, "adapter", None) is not None:
        out = base(input_values=inputs, attention_mask=attention_mask if give_mask else None,
                   output_hidden_states=hidden_states)
        hidden = out.last_hidden_state
        mask = None if attention_mask is None else frame_mask(hf_model, attention_mask, hidden.shape[1])
        return hidden, mask, list(out.hidden_states) if hidden_states else None
    features = _conv_features(base.feature_extractor, inputs).transpose(1, 2)
    mask = None if attention_mask is None else frame_mask(hf_model, attention_mask, features.shape[1])
    hidden = base.feature_projection(features)
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # wav2vec2: (hidden, normalised features)
    if base.training and getattr(config, "apply_spec_augment", True) and \
            (config.mask_time_prob > 0 or config.mask_feature_prob > 0):
        hidden = base._mask_hidden_states(hidden, attention_mask=mask if give_mask else None)
    attention = None
    if give_mask:
        hidden = torch.where(mask[..., None], hidden, 0.0)  # padded frames are zero, as in HF's encoder
        attention = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=mask,
                                              allow_is_bidirectional_skip=False)
    stable = type(encoder).__name__.endswith("StableLayerNorm")
    hidden = hidden + encoder.pos_conv_embed(hidden)
    if not stable:
        hidden = encoder.layer_norm(hidden)
    hidden = encoder.dropout(hidden)
    states = [hidden] if hidden_states else None
    layerdrop = encoder.training and config.layerdrop > 0.0 and not _synced(encoder)
    for layer in encoder.layers:
        if not (layerdrop and torch.rand([]) < config.layerdrop):  # drawn on the host, as HF does
            out = layer(hidden, attention_mask=attention)
            hidden = out[0] if isinstance(out, tuple) else out
        if states is not None:  # a skipped layer passes its input on: one state per layer, as the weights expect
            states.append(hidden)
    if stable:
        hidden = encoder.layer_norm(hidden)
    return hidden, mask, states


def _conv_features(extractor, inputs):
    """The convolutional feature encoder's forward. HF marks the input as requiring grad whenever it trains
    (for reentrant checkpointing), which breaks ``torch.compile`` graphs; here only under checkpointing."""
    layers = getattr(extractor, "conv_layers", None)
    if layers is None:
        return extractor(inputs)
    hidden = inputs[:, None]
    if getattr(extractor, "_requires_grad", False) and extractor.training and \
            any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        hidden.requires_grad = True
    for layer in layers:
        hidden = layer(hidden)
    return hidden


def _synced(encoder) -> bool:
    """Under DeepSpeed ZeRO-3 or FSDP every rank runs every layer (HF skips layerdrop there)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from transformers.integrations.fsdp import is_fsdp_managed_module

    return bool(is_deepspeed_zero3_enabled() or is_fsdp_managed_module(encoder))


def _wrap(hf_model, extractor, probe: bool):
    """The model sertk trains: :func:`encode`, a masked mean (:func:`masked_mean`), then the checkpoint's
    ``projector`` and ``classifier`` (pooling first: the projector is linear, so this equals HF's
    projector-then-pool). State-dict keys are HF's under ``hf.`` (plus ``layer_weights`` for a probe)."""
    import torch

    class Wrapped(torch.nn.Module, SerModelMixin):
        input_kind = "wave"

        def __init__(self) -> None:
            super().__init__()
            self.hf = hf_model
            self.normalize = bool(getattr(extractor, "do_normalize", True))
            self.probe = probe
            c = hf_model.config  # HF's layerdrop and masking leave some parameters without gradient on some steps
            self.find_unused_parameters = bool(getattr(c, "layerdrop", 0) or getattr(c, "mask_time_prob", 0)
                                               or getattr(c, "mask_feature_prob", 0))
            if probe:
                n = hf_model.config.num_hidden_layers + 1
                self.layer_weights = torch.nn.Parameter(torch.zeros(n))
                for p in hf_model.base_model.parameters() if hasattr(hf_model, "base_model") else []:
                    p.requires_grad = False

        def featurizer(self) -> Normalize:
            return Normalize(self.normalize)

        def forward(self, inputs, attention_mask=None):
            weights = self.layer_weights if self.probe else \
                getattr(self.hf, "layer_weights", None) if getattr(self.hf.config, "use_weighted_layer_sum",
                                                                   False) else None
            hidden, mask, states = encode(self.hf, inputs, attention_mask, hidden_states=weights is not None)
            if weights is not None:  # a learnable weighted sum of every layer (SUPERB style)
                hidden = (torch.softmax(weights, 0)[:, None, None, None] * torch.stack(states, dim=0)).sum(0)
            return self.hf.classifier(self.hf.projector(masked_mean(hidden, mask)))

    return Wrapped()


def _probe_head(config, num_labels: int, projector=None, classifier=None):
    """A frozen probe on cached pooled hidden states: (B, layers + 1, hidden) -> logits (B, num_labels)."""
    import torch

    class CachedProbe(torch.nn.Module, SerModelMixin):
        input_kind = "vector"  # the ssl featurizer's (layers + 1, hidden) array per utterance, stacked

        def __init__(self) -> None:
            super().__init__()
            self.layer_weights = torch.nn.Parameter(torch.zeros(config.num_hidden_layers + 1))
            self.projector = projector if projector is not None else \
                torch.nn.Linear(config.hidden_size, config.classifier_proj_size)
            self.classifier = classifier if classifier is not None else \
                torch.nn.Linear(config.classifier_proj_size, num_labels)

        def featurizer(self):
            return None  # cached features only: no waveform is featurised on the fly

        def forward(self, inputs, attention_mask=None):
            # = the uncached probe: projector(mean_t(sum_l w_l h_l)) = projector(sum_l w_l mean_t(h_l))
            pooled = torch.einsum("l,blh->bh", torch.softmax(self.layer_weights, 0).to(inputs.dtype), inputs)
            return self.classifier(self.projector(pooled))

    return CachedProbe()


def _labels() -> dict:
    return {"id2label": dict(enumerate(EMOTIONS)), "label2id": {e: i for i, e in enumerate(EMOTIONS)}}


class Hubert(ModelPlugin):
    name = "hubert"
    description = "Hugging Face SSL checkpoint (HuBERT, wav2vec2, WavLM, data2vec-audio) from a hub id or folder"
    params = (
        Param("checkpoint", REFERENCE_CHECKPOINT, "hub id or local folder"),
        Param("freeze_feature_encoder", False, "freeze the convolutional feature encoder", type="bool"),
        Param("probe", False, "freeze the encoder; classify from a learnable weighted sum of all layers",
              type="bool"),
        Param("gradient_checkpointing", False, "trade compute for memory", type="bool"),
        *HF_REGULARISERS,
    )
    train_defaults = {"lr": 1e-5, "epochs": 7, "batch_size": 8, "checkpoint_every": 0}
    """``checkpoint_every`` 0: a HuBERT-Large state is 3.8 GB (weights + AdamW moments), so a 7-epoch run writes
    only its best weights (1.3 GB) unless it is interrupted (docs/benchmarks.md, "Checkpoint bytes")."""

    def _load(self, source: str, num_labels: int, from_config_only: bool = False):
        _quiet_transformers()
        from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForAudioClassification

        source, kwargs = resolve_checkpoint(source)
        try:
            extractor = AutoFeatureExtractor.from_pretrained(source, **kwargs)
        except (OSError, ValueError):
            extractor = None
        try:
            if from_config_only:  # the architecture only: built without initialising (see empty_module)
                config = AutoConfig.from_pretrained(source, **kwargs)
                config.num_labels = num_labels
                config.update(_labels())
                model = empty_module(lambda: AutoModelForAudioClassification.from_config(config))
            else:
                model = AutoModelForAudioClassification.from_pretrained(
                    source, num_labels=num_labels, ignore_mismatched_sizes=True, **_labels(), **kwargs)
        except (OSError, ValueError) as exc:
            raise SertkError(f"cannot load model '{source}': {str(exc).splitlines()[0]}",
                             "pass a folder or hub id of an audio classification checkpoint") from None
        return model, extractor

    def featurizer_spec(self):
        if self.options["probe"]:  # every layer's pooled hidden states, computed once into the feature cache
            return "ssl", {"checkpoint": self.options["checkpoint"]}
        return None

    def build(self, num_labels: int, run_dir: Path | None = None, **train_options):
        model, extractor = self._load(self.options["checkpoint"], num_labels)
        if self.options["probe"]:
            return self._cached_probe(model, run_dir)
        return self._finish(model, extractor, run_dir)

    def _cached_probe(self, model, run_dir: Path | None):
        """The probe head with the checkpoint's projector and the (re-headed) classifier; the encoder is dropped."""
        from ser_toolkit.plugins.ssl_features import SslFeatures

        head = _probe_head(model.config, model.config.num_labels, model.projector.float(), model.classifier.float())
        if run_dir is not None:
            digest = SslFeatures(checkpoint=self.options["checkpoint"]).checkpoint_digest()
            if any((run_dir / "checkpoints").glob("*")):  # resuming: the epochs so far read the recorded weights
                self._check_probe_checkpoint(run_dir, digest)
            model.config.save_pretrained(run_dir / "model")
            write_text(run_dir / "model" / PROBE_FILE, json.dumps(
                {"checkpoint": self.options["checkpoint"], "checkpoint_sha256": digest}, indent=2) + "\n")
        return head

    def _check_probe_checkpoint(self, run_dir: Path, now: str) -> None:
        """Refuse a checkpoint whose files differ from those the run's probe was trained on."""
        try:
            recorded = json.loads((run_dir / "model" / PROBE_FILE).read_text())["checkpoint_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            raise SertkError(f"run {run_dir} has no readable model/{PROBE_FILE} (trained before probes were cached, "
                             "or damaged)", "retrain the run") from None
        if now != recorded:
            raise SertkError(f"checkpoint {self.options['checkpoint']} changed since run {run_dir} was trained on its "
                             f"hidden states (files {str(recorded)[:12]} -> {now[:12]})",
                             "restore the checkpoint the probe was trained on, or retrain the run")

    def _rebuild_probe(self, num_labels: int, run_dir: Path):
        from transformers import AutoConfig

        from ser_toolkit.plugins.ssl_features import SslFeatures

        self._check_probe_checkpoint(run_dir, SslFeatures(checkpoint=self.options["checkpoint"]).checkpoint_digest())
        _quiet_transformers()
        return _probe_head(AutoConfig.from_pretrained(run_dir / "model"), num_labels)

    def _finish(self, model, extractor, run_dir: Path | None):
        if run_dir is not None:  # the checkpoint's own description: its modules (e.g. masked_spec_embed, which
            # exists when the checkpoint ships mask_time_prob > 0) are what rebuild() must build again
            model.config.save_pretrained(run_dir / "model")
            if extractor is not None:
                extractor.save_pretrained(run_dir / "model")
        for p in HF_REGULARISERS:  # read by the model at every forward (training mode only)
            setattr(model.config, p.name, float(self.options[p.name]))
        masking = bool(self.options["mask_time_prob"] or self.options["mask_feature_prob"])
        model.config.apply_spec_augment = masking
        embed = getattr(getattr(model, "base_model", model), "masked_spec_embed", None)
        if masking and embed is None:
            raise SertkError("this checkpoint has no mask embedding (it was built without masking), so "
                             "mask_time_prob/mask_feature_prob cannot be used", "leave them at 0")
        if embed is not None and not masking:
            embed.requires_grad_(False)  # unused: no gradient, and DDP need not look for unused parameters
        if self.options["freeze_feature_encoder"] and hasattr(model, "freeze_feature_encoder"):
            model.freeze_feature_encoder()
        if self.options["gradient_checkpointing"] and hasattr(model, "gradient_checkpointing_enable"):
            # non-reentrant: correct under DDP without find_unused_parameters (transformers 5 renamed the method)
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        return _wrap(model, extractor, self.options["probe"])

    def rebuild(self, num_labels: int, run_dir: Path):
        """The trained module, offline, from ``RUN/model`` (the checkpoint's config, sertk's options applied
        again), its tensors left uninitialised: the run's weights are loaded into it (strictly) next."""
        if self.options["probe"]:
            return self._rebuild_probe(num_labels, run_dir)
        model, extractor = self._load(str(run_dir / "model"), num_labels, from_config_only=True)
        return self._finish(model, extractor, None)


class Tiny(Hubert):
    name = "tiny"
    description = "a small randomly initialised HuBERT built from a config (offline demos and tests)"
    params = (
        Param("hidden_size", 64, "transformer width", type="int", min=8, max=1024),
        Param("layers", 2, "transformer layers", type="int", min=1, max=24),
        Param("heads", 2, "attention heads", type="int", min=1, max=16),
        Param("seed", 0, "initialisation seed", type="int", min=0),
        Param("freeze_feature_encoder", False, "freeze the convolutional feature encoder", type="bool"),
        Param("probe", False, "freeze the encoder; weighted sum of layers", type="bool"),
        Param("gradient_checkpointing", False, "trade compute for memory", type="bool"),
        *HF_REGULARISERS,
    )
    train_defaults = {"lr": 1e-3, "epochs": 15, "batch_size": 16}

    def featurizer_spec(self):
        return None  # no checkpoint to key cached features on: its probe runs the encoder (see the module doc)

    def config(self, num_labels: int):
        from transformers import HubertConfig

        o = self.options
        return HubertConfig(hidden_size=o["hidden_size"], num_hidden_layers=o["layers"],
                            num_attention_heads=o["heads"], intermediate_size=2 * o["hidden_size"],
                            conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 2), conv_kernel=(10, 8, 4, 4),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                            classifier_proj_size=o["hidden_size"], num_labels=num_labels, **_labels(),
                            **{p.name: float(o[p.name]) for p in HF_REGULARISERS})

    def build(self, num_labels: int, run_dir: Path | None = None, **train_options):
        _quiet_transformers()
        import torch
        from transformers import HubertForSequenceClassification, Wav2Vec2FeatureExtractor

        torch.manual_seed(self.options["seed"])
        model = HubertForSequenceClassification(self.config(num_labels))
        extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                                             return_attention_mask=True)
        return self._finish(model, extractor, run_dir)

    def rebuild(self, num_labels: int, run_dir: Path):
        return self.build(num_labels, None)


@hookimpl
def register_models(registry) -> None:
    registry.register(Hubert)
    registry.register(Tiny)
