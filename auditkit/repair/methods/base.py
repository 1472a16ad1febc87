"""What a repair method is: one ``MethodSpec`` per file of this package (the registry finds them).

A method declares what it needs (masks and what they mark, a teacher), its defaults (λ, training
settings, the λ sweep), its own options (a dataclass), how it prepares the training data, how it
builds its objective, and the page that documents it. ``run_repair`` reads nothing else, so a new
method is one new file here and no other edit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...data import AuditDataset
from ...data.meaning import masks_marking, require
from ...errors import ParameterError
from ...training import Objective


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str  # one line: what the loss does, with its source
    masks: str | None  # None: needs no masks; "spurious": masks mark the artefact; "object": masks mark the object
    teacher: str  # "none", "annotates" (a teacher may annotate the masks, TAP §4.2) or "required" (TEA)
    default_lambda: float
    sweep: tuple[float, ...]  # λ candidates of lambda="auto"
    build: Callable[[Any, Any, Any], Objective]  # (model, options, teacher) -> objective
    doc: str  # docs/methods/<name>.md
    options: type = NoOptions  # a frozen dataclass of the method's own options, with defaults
    training: dict = field(default_factory=dict)  # TrainConfig defaults (epochs, grad_clip, schedule)
    teacher_mask_lambda: float | None = None  # λ when the masks come from a teacher (TAP App. C)
    transformer_lambda: float | None = None  # λ for a vision transformer's model, where it differs (measured)
    # (model, train data, options, mask_meaning, batch_size, device, show_progress) -> train data
    prepare_data: Callable | None = None
    # Masks that mark the other thing than ``masks`` (auditkit/data/meaning.py): why their complement
    # within the image is sound for this loss; "" refuses them in one line naming mask_meaning, with
    # ``complement_unsound`` saying why.
    complement_sound: str = ""
    complement_unsound: str = ""
    # Options swept together with λ by lambda="auto" unless the caller sets them: name -> candidates
    # (TAP: the dilation schedule).
    sweep_options: dict = field(default_factory=dict)
    # Where the method is listed (help, errors, docs), cheapest first by docs/repair.md's measured cost.
    rank: int = 100
    # Its place in the order --method auto tries methods (run_auto_repair), cheapest first by the same
    # measurements; None: auto never tries it. TEA comes before Energy there: with a teacher it needs no masks.
    auto_rank: int | None = None

    def check_masks(self, meaning: str) -> None:
        """ParameterError (one line naming mask_meaning) when masks that mark ``meaning`` cannot serve
        this method, as they are or as their complement. Reads no pixels."""
        if self.masks is not None:
            require(meaning, self.masks, self.name, convert=bool(self.complement_sound), why=self.complement_unsound)

    def training_masks(self, train: AuditDataset) -> AuditDataset:
        """``train`` with masks that mark what this method needs: as they are, or their complement."""
        if self.masks is None:
            return train  # (MaskTune, TEA: no masks read, whatever they mark)
        return masks_marking(train, self.masks, self.name, convert=bool(self.complement_sound),
                             why=self.complement_unsound)

    def make_options(self, given: dict | None) -> Any:
        """The method's options from ``given`` (name -> value); unknown names raise ParameterError."""
        given = dict(given or {})
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(given) - known)
        if unknown:
            allowed = ", ".join(sorted(known)) or "none"
            raise ParameterError("options", f"has {unknown[0]!r}, which {self.name} does not take "
                                 f"(its options: {allowed})")
        options = self.options(**given)
        check = getattr(options, "validate", None)
        if check is not None:
            check()
        return options
