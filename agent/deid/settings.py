"""De-identification settings: mode, Annex E options, recipients, pixel-clean rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cryptography import x509

from agent.config import DEID_OPTIONS
from agent.errors import DeidError

# The option names are part of the config contract, so agent.config owns them.
OPTIONS: tuple[str, ...] = DEID_OPTIONS

Mode = Literal["strip", "encrypt"]


@dataclass(frozen=True)
class PixelCleanRule:
    """Regions known to hold burned-in text on one device model and image size."""

    manufacturer: str
    model: str
    rows: int
    columns: int
    rectangles: tuple[tuple[int, int, int, int], ...]  # x, y, width, height

    def matches(self, manufacturer: str, model: str, rows: int, columns: int) -> bool:
        return (
            self.manufacturer.strip().casefold() == manufacturer.strip().casefold()
            and self.model.strip().casefold() == model.strip().casefold()
            and self.rows == rows
            and self.columns == columns
        )


@dataclass(frozen=True)
class DeidSettings:
    mode: Mode = "strip"
    options: frozenset[str] = frozenset()
    recipients: tuple[x509.Certificate, ...] = ()  # required non-empty for encrypt
    pixel_clean: tuple[PixelCleanRule, ...] = ()

    def problems(self) -> list[str]:
        """Every configuration problem at once (empty when valid)."""
        out: list[str] = []
        if self.mode not in ("strip", "encrypt"):
            out.append(f"deid mode {self.mode!r} is not 'strip' or 'encrypt'")
        unknown = sorted(self.options - set(OPTIONS))
        if unknown:
            out.append(f"unknown deid option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
        if {
            "retain_longitudinal_full_dates",
            "retain_longitudinal_modified_dates",
        } <= self.options:
            out.append(
                "retain_longitudinal_full_dates and retain_longitudinal_modified_dates "
                "exclude each other; choose one"
            )
        if self.mode == "encrypt" and not self.recipients:
            out.append("deid mode 'encrypt' needs at least one recipient certificate")
        for rule in self.pixel_clean:
            for x, y, w, h in rule.rectangles:
                if x < 0 or y < 0 or w <= 0 or h <= 0:
                    out.append(
                        f"pixel-clean rule {rule.manufacturer}/{rule.model}: rectangle "
                        f"{(x, y, w, h)} must have x, y >= 0 and a positive size"
                    )
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise DeidError(
                "invalid de-identification settings: " + "; ".join(problems),
                hint="fix the [deid] section of the config or the command-line options",
            )
