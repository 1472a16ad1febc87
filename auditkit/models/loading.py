"""Reading a checkpoint for use: the weights, where the logits are, eval mode.

    model = load_model("shortcut.safetensors", ReadOptions(output="logits"))

The jobs that start from a file (repair, explain, audit) and the command line read checkpoints
through this one function, so the reading options mean the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ParameterError
from .checkpoint import load_checkpoint
from .outputs import use_head, use_output


@dataclass(frozen=True)
class ReadOptions:
    """How to read a checkpoint: the architecture of bare weights, whether pickles may run code,
    the input normalisation and where the logits are when the file does not record them."""

    arch: str | None = None
    trust_pickle: bool = False  # only for files from an author one trusts: unpickling can run code
    normalize: str | None = None  # a name or MEAN/STD (auditkit.models.normalization)
    output: str | int | None = None  # a key, field or index of the forward's output (models.outputs)
    input_size: tuple[int, int] | None = None  # (H, W) of bare weights
    head: str | None = None  # softmax | binary | multilabel; None: the file's record, else read off the network


def load_model(path: str | Path, reading: ReadOptions = ReadOptions()):
    """The AuditModel at ``path`` (a checkpoint file, or a Hugging Face / timm model folder:
    auditkit/models/folders.py), reading its logits where ``reading.output`` says, in eval mode."""
    from .folders import is_model_folder, load_folder

    if is_model_folder(path):
        if reading.arch is not None:
            raise ParameterError("arch", f"does not apply to {path}: a model folder's config.json names its "
                                         "architecture")
        model = load_folder(path, input_size=reading.input_size, normalize=reading.normalize)
    else:
        model = load_checkpoint(path, arch=reading.arch, trust_pickle=reading.trust_pickle,
                                input_size=reading.input_size, normalize=reading.normalize)
    return use_head(use_output(model, reading.output), reading.head).eval()


__all__ = ["ReadOptions", "load_model"]
