"""The one place agent/ touches pydicom's private parts: raw element storage, the
character set a data set decodes with, and the table of standard UIDs.

Why raw access at all: pydicom decodes an element (and runs its value checks) the
moment it is read through the public API.  De-identification, the burned-in text
rules, the writer and the pipeline's pixel hand-over must look at, copy or move
elements *without* decoding them: a peer's malformed value would otherwise raise
half-way through a data set, and decoding every element of a large instance costs
time the box does not have.  pydicom keeps the elements of a data set in
``Dataset._dict`` (tag -> DataElement or the still undecoded RawDataElement).

Everything here reads or returns pydicom's own objects, unchanged; it exists so
that a pydicom release that moves one of these breaks in this file only (the
tests of deid/ and the pipeline exercise every function).  Imports only pydicom.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from pydicom._uid_dict import UID_dictionary
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

Element = DataElement | RawDataElement


def elements(ds: Dataset) -> MutableMapping[BaseTag, Element]:
    """The data set's element storage itself: reading it decodes nothing; writing it
    stores an element (raw or not) as is, without pydicom's checks."""
    return ds._dict  # noqa: SLF001


def raw(ds: Dataset, tag: BaseTag) -> Element | None:
    """The element at ``tag`` as stored (a RawDataElement until something decoded it)."""
    return ds._dict.get(tag)  # noqa: SLF001


def parent_encoding(ds: Dataset) -> str | list[str]:
    """The character set a sequence item inherits from its parent data set."""
    return ds._parent_encoding  # noqa: SLF001


def character_set(ds: Dataset) -> str | list[str]:
    """The Python codec(s) pydicom decodes this data set's text with."""
    return ds._character_set  # noqa: SLF001


def standard_uids() -> Mapping[str, tuple[str, str, str, str, str]]:
    """Every UID the DICOM standard defines (pydicom's table): UID -> (name, type,
    info, retired, keyword)."""
    return UID_dictionary
