"""De-identification: DICOM PS3.15 Annex E, strip or encrypt (see docs/deid.md).

Owns the rule table and its engine, pseudonyms, the encrypted-attributes envelope,
re-identification, burned-in text rules and the writer of de-identified files.
May import: agent.config, agent.crypto, agent.errors, agent.dicomraw, agent.pixelbound
(the decoded-size bound), agent.uplink.vocabulary (the fixed words a quarantine
reason may use). Works on data sets, never on the network.
"""

from agent.deid.engine import Deidentifier, DeidOutcome
from agent.deid.settings import OPTIONS, DeidSettings, PixelCleanRule

__all__ = ["OPTIONS", "DeidOutcome", "DeidSettings", "Deidentifier", "PixelCleanRule"]
