"""How images become embeddings: one settings object, passed in, stored as-is, compared by one function.

The model fixes its own preprocessing (input size, mean, std, channel order: :class:`core.meta.ModelMeta`,
checked by fingerprint). What the user chooses on top is :class:`EmbedSettings`:

- ``flip``: flip test-time augmentation, ``e(x) + e(mirror(x))``;
- ``align``: how a face is brought to the model's template before the resize: ``none`` (the image is
  already a template crop), ``haar`` (crop around the largest Haar-detected face, :mod:`core.facecrop`)
  or ``landmarks`` (detected five-point landmarks, similarity-aligned, :mod:`facefuse.align`);
  ``auto`` is resolved when a model is loaded (:func:`resolve_align`) and never stored;
- ``center``: scores are cosines of embeddings centred on the mean of the images scored together;
- ``batch_size``, ``workers``, ``skip_missing``: how the work is done, not what it computes.

The first three change the vectors (:data:`VECTOR_FIELDS`); a calibration record, an ``embed``
manifest and a gallery store the whole object (:meth:`EmbedSettings.to_dict`) and
:func:`settings_mismatch` compares a stored one with the one in use. Records written before this
object existed kept ``flip_tta`` / ``detect`` / ``center`` loose; :meth:`EmbedSettings.from_record`
reads those too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ParameterError

ALIGNMENTS = ("none", "haar", "landmarks")
AUTO = "auto"  # resolved by the model: landmarks for a model trained on template crops, else none
VECTOR_FIELDS = ("flip", "align", "center")  # the settings an embedding (and a threshold) depends on


@dataclass(frozen=True)
class EmbedSettings:
    """How images become embeddings (see the module docstring). Immutable: derive with :meth:`replace`."""

    flip: bool = False
    align: str = "none"
    center: bool = False
    batch_size: int = 64
    workers: int | None = None
    skip_missing: bool = False

    def __post_init__(self):
        if self.align not in ALIGNMENTS + (AUTO,):
            raise ParameterError("align", self.align, f"unknown alignment; valid: {', '.join(ALIGNMENTS + (AUTO,))}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ParameterError("batch_size", self.batch_size, "must be an integer >= 1")
        if self.workers is not None and not (isinstance(self.workers, int) and self.workers >= 0):
            raise ParameterError("workers", self.workers, "must be an integer >= 0 (or None: automatic)")
        for name in ("flip", "center", "skip_missing"):
            if not isinstance(getattr(self, name), bool):
                raise ParameterError(name, getattr(self, name), "must be True or False")

    def replace(self, **changes) -> "EmbedSettings":
        """A copy with ``changes`` (``None`` values are ignored, so CLI defaults pass through)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            name = sorted(unknown)[0]
            raise ParameterError(name, changes[name], f"not an embedding setting; valid: {', '.join(FIELDS)}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        """The whole object, as records store it."""
        return dataclasses.asdict(self)

    def vectors(self) -> dict:
        """The settings the embeddings depend on (:data:`VECTOR_FIELDS`)."""
        return {k: getattr(self, k) for k in VECTOR_FIELDS}

    def describe(self) -> str:
        """``flip off, align none[, centred]``: how the vectors were made, in words."""
        return (f"flip {'on' if self.flip else 'off'}, align {self.align}"
                + (", centred" if self.center else ""))

    @classmethod
    def from_record(cls, record: dict | None) -> "EmbedSettings":
        """The settings a stored record was made with: its ``settings`` entry, or the loose keys of
        records written before it (``flip_tta``, ``detect``, ``center``); absent keys are defaults."""
        record = record or {}
        if isinstance(record.get("settings"), dict):
            stored = record["settings"]
            return cls(**{f.name: stored[f.name] for f in dataclasses.fields(cls) if f.name in stored})
        return cls(flip=bool(record.get("flip_tta", False)), align=record.get("detect", "none"),
                   center=bool(record.get("center", False)))


FIELDS = tuple(f.name for f in dataclasses.fields(EmbedSettings))


def resolve_align(align: str, trained_on: str) -> str:
    """``align`` as given, or for ``auto`` what a photo needs for a model whose training faces were
    framed as ``trained_on`` (``ModelMeta.alignment``): ``landmarks`` for template crops (a photo that
    is a template crop already passes through: the aligner snaps it), ``none`` otherwise."""
    if align != AUTO:
        return align
    return "landmarks" if trained_on == "template" else "none"


def settings_mismatch(stored: EmbedSettings, now: EmbedSettings, *, made: str = "made",
                      uses: str = "this run uses", fields=VECTOR_FIELDS) -> str | None:
    """Why vectors (or a threshold) made with ``stored`` settings do not match ones made with
    ``now``: ``"made with flip on, align none; this run uses flip off, align none"``, or None when
    the ``fields`` agree. ``made`` / ``uses`` word the two sides."""
    if all(getattr(stored, f) == getattr(now, f) for f in fields):
        return None
    return f"{made} with {stored.describe()}; {uses} {now.describe()}"
