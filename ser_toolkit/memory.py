"""Out-of-memory errors of a device, as one line that names the batch and the settings that shrink it."""

from __future__ import annotations

from typing import Any

from ser_toolkit.errors import OutOfMemory

GPU_SHARE_ENV = "SERTK_GPU_MEMORY_SHARE"
"""The share of its GPU's memory a run may take: set by a study's local workers that share a GPU
(``[study] runs_per_gpu``), kept to by the training loop, so that one run's out-of-memory error never hits
another."""
TRAIN_FIX = "{seconds_verb} --batch-seconds{seconds} or lower --batch-size{size}"
TRAIN_FIX_CHECKPOINTING = ", or pass --gradient-checkpointing"
TRAIN_FIX_RETRY = " (a study: the same [training] settings, or --oom-retry to retry a run once with half the batch)"
EVAL_FIX = "{seconds_verb} sertk evaluate --batch-seconds{seconds} or lower --batch-size{size}"
STUDY_EVAL_FIX = ("evaluate the run with smaller batches: sertk evaluate {run} --batch-seconds 60 --batch-size 16, "
                  "then run the study again")
PREDICT_FIX = "predict on the CPU instead: CUDA_VISIBLE_DEVICES= sertk predict ..."
VALID_FIX = "lower --batch-size{size} (validation batches hold as many utterances as training batches)"


def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation that failed: CUDA's (``torch.OutOfMemoryError``) or the CPU allocator's."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def batch_facts(inputs: Any, mask: Any, rate: int) -> dict[str, Any]:
    """Utterances and padded seconds of a batch of waveforms (``inputs`` (B, T)), or its size (vectors)."""
    shape = tuple(getattr(inputs, "shape", ()))
    facts: dict[str, Any] = {"utterances": int(shape[0]) if shape else 0}
    if mask is not None and len(shape) == 2:
        facts["padded_seconds"] = round(shape[0] * shape[1] / rate, 1)
    return facts


def _device_line(device: Any) -> str:
    import sys

    torch = sys.modules.get("torch")
    if torch is None or getattr(device, "type", None) != "cuda":
        return ""
    try:
        free, total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_allocated(device)
    except Exception:  # noqa: BLE001 - the facts are a courtesy; the error stands without them
        return ""
    return f"; {torch.cuda.get_device_name(device)}: {total / 2**30:.1f} GiB, {held / 2**30:.1f} GiB held by " \
           f"tensors, {free / 2**30:.1f} GiB free"


def out_of_memory(device: Any, where: str, batch: dict[str, Any], batch_seconds: float | None,
                  batch_size: int | None, fix: str = TRAIN_FIX) -> OutOfMemory:
    """The one-line error for a device that ran out of memory ``where`` (e.g. "in epoch 2, step 14") on
    ``batch`` (:func:`batch_facts`), naming the settings in effect."""
    kind = "GPU" if getattr(device, "type", None) == "cuda" else str(getattr(device, "type", "device")).upper()
    n = batch.get("utterances")
    audio = f", {batch['padded_seconds']:g} s of padded audio" if "padded_seconds" in batch else ""
    on = f" on a batch of {n} utterance{'' if n == 1 else 's'}{audio}" if n else ""
    return OutOfMemory(f"{kind} out of memory {where}{on}{_device_line(device)}",
                       fix.replace("{seconds_verb}", "lower" if batch_seconds else "set")
                       .replace("{seconds}", f" (now {batch_seconds:g})" if batch_seconds else " (e.g. 30)")
                       .replace("{size}", f" (now {batch_size})" if batch_size else ""), batch)
