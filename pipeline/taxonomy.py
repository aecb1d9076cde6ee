"""Cell classes: names, lineages and how each enters the differential."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.params import Params

# M:E counts "myeloid" (granulocytes and their precursors) against "erythroid"; monocytes and
# lymphocytes are in the differential but in neither side of the ratio (ICSH).
Lineage = Literal["myeloid", "erythroid", "monocytic", "lymphoid", "other", "non_leukocyte"]


class CellClass(Params):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    label: str
    lineage: Lineage
    blast: bool
    key: str = Field(min_length=1, max_length=1)
    reviewer_only: bool = Field(
        default=False,
        description="a class the model does not output, which only a reviewer assigns: a cell "
        "type the lab counts but has no training crops for (blasts, plasma cells on the "
        "shipped model); it enters the differential like any other class")

    @property
    def counted(self) -> bool:
        """Non-leukocytes are reported but never enter the differential."""
        return self.lineage != "non_leukocyte"


class Taxonomy(Params):
    name: str
    classes: tuple[CellClass, ...] = Field(min_length=2)

    @model_validator(mode="after")
    def _unique(self) -> "Taxonomy":
        for attr in ("name", "key"):
            values = [getattr(c, attr) for c in self.classes]
            dup = {v for v in values if values.count(v) > 1}
            if dup:
                raise ValueError(f"duplicate class {attr}(s): {sorted(dup)}")
        if len(self.model_names) < 2:
            raise ValueError("a taxonomy needs at least two classes a model outputs "
                             "(not reviewer_only)")
        return self

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def labels(self) -> dict[str, str]:
        """Each class's label (what a person reads) by its name."""
        return {c.name: c.label for c in self.classes}

    @property
    def counted(self) -> list[str]:
        return [c.name for c in self.classes if c.counted]

    @property
    def model_names(self) -> list[str]:
        """The classes a model of this taxonomy outputs, in its output order (every class but
        the reviewer-only ones)."""
        return [c.name for c in self.classes if not c.reviewer_only]

    @property
    def reviewer_only(self) -> list[str]:
        """The classes only a reviewer names (no model outputs them)."""
        return [c.name for c in self.classes if c.reviewer_only]

    @property
    def blasts_by_review(self) -> bool:
        """True when the taxonomy counts blasts but only a reviewer names them: the blast %
        rests on someone having looked at every counted cell."""
        blasts = [c for c in self.classes if c.blast and c.counted]
        return bool(blasts) and all(c.reviewer_only for c in blasts)

    def get(self, name: str) -> CellClass:
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(f"class {name!r} is not in taxonomy {self.name!r}")

    def index(self, name: str) -> int:
        return self.names.index(self.get(name).name)
