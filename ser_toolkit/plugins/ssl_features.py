"""``ssl``: every layer's mean-pooled hidden states of a frozen self-supervised speech model.

Per utterance: the checkpoint's base model (HuBERT, wav2vec 2.0, WavLM,
data2vec-audio: ``AutoModel``) in eval mode, run once on the utterance with
``output_hidden_states=True``; each hidden state (the input of the first
transformer layer, then every layer's output) is averaged over time, giving a
float32 array of shape ``(num_hidden_layers + 1, hidden_size)``. A frozen
probe (``--model hubert --probe``) learns a weighted sum of these layers, so a
whole probe study costs one encoder forward pass per utterance (the feature
cache), however many runs, seeds and epochs read it.

- Input: the checkpoint's own normalisation (``do_normalize`` of its feature
  extractor: zero mean, unit variance per utterance), as the ``hubert`` model
  plugin applies. Input shorter than the convolutional encoder's receptive
  field (400 samples for the usual encoders) is zero-padded to it.
- Each utterance is run on its own, unpadded (batch of one): padding changes
  the output of group-norm checkpoints, and no result depends on which other
  utterances share a chunk.
- float32 throughout; on CUDA, TF32 is switched off while extracting.
- Identity: the SHA-256 of the checkpoint's files (weights, ``config.json``,
  ``preprocessor_config.json``) and the transformers version, not the path: new
  weights saved into the same folder give another feature file, and the same
  weights anywhere share one. The device is not part of it.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ser_toolkit import hookimpl
from ser_toolkit.errors import SertkError
from ser_toolkit.featurizers import Featurizer
from ser_toolkit.params import Param
from ser_toolkit.plugins.hubert import REFERENCE_CHECKPOINT, Normalize, _quiet_transformers, resolve_checkpoint

RATE = 16000
DIGESTED = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
"""Weight files (by suffix) that enter a checkpoint's digest, with config and preprocessor config and indexes."""
_FILE_DIGESTS: dict[tuple, str] = {}  # (real path, size, mtime_ns, ctime_ns, inode) -> sha256: once per process


def _file_sha256(path: Path) -> str:
    from ser_toolkit.training.runs import file_digest

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _FILE_DIGESTS:
        _FILE_DIGESTS[key] = file_digest(path)
    return _FILE_DIGESTS[key]


def folder_digest(folder: Path) -> str:
    """SHA-256 over the name and content digest of every file that defines a checkpoint's outputs."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and (
        p.name.endswith(DIGESTED) or p.name.endswith(".index.json")
        or p.name in ("config.json", "preprocessor_config.json")))
    if not any(p.name.endswith(DIGESTED) for p in files):
        raise SertkError(f"model folder {folder} holds no weights (*.safetensors or *.bin)",
                         "pass a folder saved with save_pretrained()")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{_file_sha256(p)}\n".encode())
    return h.hexdigest()


def checkpoint_folder(source: str) -> Path | None:
    """The local folder holding a resolved checkpoint (a folder, or its snapshot in the Hugging Face cache);
    None when it is not downloaded yet."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(source, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


class SslFeatures(Featurizer):
    """Mean-pooled hidden states of every layer of a frozen SSL checkpoint (see the module doc)."""

    name = "ssl"
    description = ("every layer's mean-pooled hidden states of a frozen SSL model (HuBERT, wav2vec2, WavLM): "
                   "(layers+1, hidden) per utterance, one forward pass")
    params = (
        Param("checkpoint", REFERENCE_CHECKPOINT, "hub id or local folder"),
        Param("device", "auto", "auto (CUDA when available), cpu, cuda, cuda:1..."),
    )
    version = "1"
    parallel = False  # one model in this process (on the GPU when there is one), not one per worker

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._model = None
        self._digest: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}  # loaded again on first use

    def _resolved(self) -> tuple[str, dict[str, Any]]:
        return resolve_checkpoint(self.options["checkpoint"])  # one line when unreachable

    def checkpoint_digest(self) -> str:
        """SHA-256 of the checkpoint's files (downloads it first when it is a hub id not cached yet)."""
        if self._digest is None:
            source, _ = self._resolved()
            folder = checkpoint_folder(source)
            if folder is None:  # a reachable hub id, not downloaded yet: loading it downloads it
                self.model()
                folder = checkpoint_folder(source)
            if folder is None:
                raise SertkError(f"checkpoint '{self.options['checkpoint']}' was loaded but its files cannot be "
                                 "found in the Hugging Face cache", "save it with save_pretrained() and pass the "
                                 "folder")
            self._digest = folder_digest(folder)
        return self._digest

    def identity(self) -> dict[str, Any]:
        import transformers

        return {"name": self.name, "options": {"checkpoint_sha256": self.checkpoint_digest()},
                "version": self.version, "transformers": transformers.__version__}

    def device(self):
        import torch

        name = self.options["device"]
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise SertkError("featurizer 'ssl': device cuda asked for, but no GPU is available",
                             "use device=cpu or auto")
        try:
            return torch.device(name)
        except RuntimeError:
            raise SertkError(f"featurizer 'ssl': unknown device {name!r}", "use auto, cpu or cuda[:N]") from None

    def model(self):
        """(base model in eval mode on its device, input normalisation, shortest input): loaded once."""
        if self._model is None:
            _quiet_transformers()
            import torch
            from transformers import AutoFeatureExtractor, AutoModel

            source, kwargs = self._resolved()
            device = self.device()  # an unusable device fails before the load
            try:
                extractor = AutoFeatureExtractor.from_pretrained(source, **kwargs)
            except (OSError, ValueError):
                extractor = None
            try:
                model = AutoModel.from_pretrained(source, dtype=torch.float32, **kwargs)
            except (OSError, ValueError, KeyError) as exc:
                raise SertkError(f"cannot load SSL checkpoint '{self.options['checkpoint']}': "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                 "pass a folder or hub id of a HuBERT, wav2vec2, WavLM or data2vec-audio "
                                 "checkpoint") from None
            config = model.config
            if not hasattr(config, "num_hidden_layers") or not hasattr(config, "conv_kernel"):
                raise SertkError(f"checkpoint '{self.options['checkpoint']}' is a {config.model_type} model, not a "
                                 "speech SSL encoder", "pass a HuBERT, wav2vec2, WavLM or data2vec-audio checkpoint")
            shortest = 1
            for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
                shortest = (shortest - 1) * stride + kernel
            model.eval().requires_grad_(False).to(device)
            self._model = (model, Normalize(bool(getattr(extractor, "do_normalize", True))), shortest)
        return self._model

    def extract(self, wave: np.ndarray, rate: int) -> np.ndarray:
        return self.extract_many([wave], rate)[0]

    def extract_many(self, waves: Sequence[np.ndarray], rate: int) -> list[np.ndarray]:
        import torch

        if rate != RATE:
            raise SertkError(f"featurizer 'ssl' needs {RATE} Hz audio (got {rate} Hz)", f"resample to {RATE} Hz")
        model, normalize, shortest = self.model()
        device = next(model.parameters()).device
        out = []
        with _no_tf32() if device.type == "cuda" else contextlib.nullcontext(), torch.inference_mode():
            for wave in waves:
                x = np.asarray(wave, dtype=np.float32).reshape(-1)
                x = normalize(x) if x.size else x
                if x.size < shortest:
                    x = np.pad(x, (0, shortest - x.size))
                hidden = model(input_values=torch.tensor(x)[None].to(device), output_hidden_states=True).hidden_states
                pooled = torch.stack([h[0].float().mean(0) for h in hidden])  # (layers + 1, hidden)
                out.append(pooled.cpu().numpy().astype(np.float32, copy=False))
        return out


@contextlib.contextmanager
def _no_tf32():
    """Full float32 matmuls and convolutions on CUDA (the training loop may have allowed TF32)."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@hookimpl
def register_featurizers(registry) -> None:
    registry.register(SslFeatures)
