"""Counting host–device synchronisations: a ``TorchDispatchMode`` probe that works on CPU as a proxy.

On a GPU the host waits for the device whenever an op needs a value or a
shape computed there: ``item()``/``bool()``/``int()`` on a tensor
(``aten._local_scalar_dense``), ops whose output shape depends on the data
(``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``,
``repeat_interleave`` without ``output_size``...), whole-tensor comparisons
(``equal``, ``allclose``), and copies of device tensors to the host.
:class:`SyncCounter` counts those ops as they are dispatched. With
``device="cpu"`` (the default without CUDA) every tensor is "the device", so
the same op kinds are counted, plus tensors handed to NumPy or Python
(``numpy()``, ``tolist()``): the count a GPU would see, measured in CI.
The proxy cannot tell tensors that would stay on the host on a GPU (e.g. the
optimizer's step counters of the for-loop AdamW); measure GPU-like settings
(fused AdamW, see :func:`count_train_step`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

ALWAYS = {  # ops that always need the host to wait for the device
    aten._local_scalar_dense.default: "scalar read (item/bool/int/float)",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.unique_dim_consecutive.default: "unique",
    aten.equal.default: "equal",
    aten.allclose.default: "allclose",
    aten.is_nonzero.default: "is_nonzero",
    aten.bincount.default: "bincount",
}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                aten._index_put_impl_.default}
"""Ops that sync when an index is a boolean (or uint8) mask: the output shape or the positions depend on it."""
COPIES = {aten._to_copy.default, aten.copy_.default}


def _tensors(x: Any):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


class SyncCounter(TorchDispatchMode):
    """Counts the dispatched ops that force a device -> host sync; ``total`` and, by kind, ``by_kind``.

    ``device``: the device type the model runs on (``"cuda"``, ``"cpu"``...; default: ``"cuda"`` when
    available). Only ops on tensors of that type count; on ``"cpu"`` (the proxy) tensors converted to
    NumPy or Python lists count too. Use as a context manager around the code to measure.
    """

    def __init__(self, device: str | None = None) -> None:
        super().__init__()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.by_kind: Counter[str] = Counter()
        self._patched: dict[str, Callable | None] = {}  # name -> torch.Tensor's own attribute, None if inherited

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def reset(self) -> None:
        self.by_kind.clear()

    def _on_device(self, args: Any, kwargs: Any) -> bool:
        return any(t.device.type == self.device for t in _tensors([*args, *kwargs.values()]))

    def _kind(self, func, args: tuple, kwargs: dict) -> str | None:
        if func in ALWAYS:
            return ALWAYS[func] if self._on_device(args, kwargs) else None
        if func is aten.repeat_interleave.Tensor:
            return "repeat_interleave" if kwargs.get("output_size") is None and self._on_device(args, kwargs) \
                else None
        if func in BOOL_INDEXED:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) and t.device.type == self.device
                   for t in _tensors(indices)):
                return "boolean-mask indexing"
            return None
        if func in COPIES and self.device != "cpu":  # a non-blocking copy (into pinned memory) does not wait
            if func is aten._to_copy.default:
                src, dst = args[0], kwargs.get("device")
                to_host = dst is not None and torch.device(dst).type == "cpu" and not kwargs.get("non_blocking")
            else:
                dst, src = args[0], args[1]
                blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
                to_host = isinstance(src, torch.Tensor) and dst.device.type == "cpu" and blocking
            if to_host and isinstance(src, torch.Tensor) and src.device.type == self.device:
                return "copy to host"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self._kind(func, args, kwargs)
        if kind is not None:
            self.by_kind[kind] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        if self.device == "cpu":  # on CPU these never dispatch a copy: count the hand-over to the host instead
            for name in ("numpy", "tolist"):
                original = getattr(torch.Tensor, name)
                self._patched[name] = torch.Tensor.__dict__.get(name)

                def counted(t, *a, _original=original, _name=name, **k):
                    self.by_kind[f"to host ({_name})"] += 1
                    return _original(t, *a, **k)

                setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, own in self._patched.items():
                if own is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, own)
            self._patched.clear()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
               mask: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """One step as the training loop takes it: forward, cross-entropy, backward, optimizer step; the loss
    (detached, on the device: not read back)."""
    logits = model(inputs, mask)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def count_train_step(model: torch.nn.Module, inputs: torch.Tensor, mask: torch.Tensor | None,
                     labels: torch.Tensor, steps: int = 2, lr: float = 1e-5) -> SyncCounter:
    """Syncs of ``steps`` training steps (after one uncounted warm-up step), with the optimizer the loop
    uses on a GPU (fused AdamW: its step counters never reach the host). ``total / steps`` is per step."""
    device = inputs.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, fused=True)
    model.train()
    train_step(model, optimizer, inputs, mask, labels)  # lazy state (optimizer moments, hooks) created here
    counter = SyncCounter(device.type)
    with counter:
        for _ in range(steps):
            train_step(model, optimizer, inputs, mask, labels)
    return counter
