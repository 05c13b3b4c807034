"""edge-agent: a hospital imaging edge box that de-identifies, infers and reports."""

__version__ = "0.1.0"
