"""De-identification: DICOM PS3.15 Annex E, strip or encrypt (see docs/deid.md)."""

from agent.deid.engine import Deidentifier, DeidOutcome
from agent.deid.settings import OPTIONS, DeidSettings, PixelCleanRule

__all__ = ["OPTIONS", "DeidOutcome", "DeidSettings", "Deidentifier", "PixelCleanRule"]
