"""Test instances: a real sample data set as a given patient, study, series and instance.

In the style of dicognito's test helpers: one call instead of the read-copy-stamp of
``CT_small.dcm`` that every test folder used to write out itself.  The pixels, SOP
class and transfer syntax are pydicom's sample's; identity and UIDs are the caller's
(fresh UIDs when not given), so a test says only what matters to it::

    study = generate_uid()
    files = write_instances(tmp_path, [make_instance(patient="Doe^Jane", study=study,
                                                     PatientID="PID-1") for _ in range(3)])
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset
from pydicom.uid import generate_uid

CT = "CT_small.dcm"  # 128x128 CT, explicit VR little endian, about 39 kB


@functools.cache
def _sample(name: str) -> FileDataset:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom has no sample {name!r} (pip install pydicom-data?)")
    ds = pydicom.dcmread(str(path))
    assert isinstance(ds, FileDataset)
    return ds


def sample(name: str = CT) -> FileDataset:
    """A private copy of one of pydicom's sample files, unchanged."""
    return copy.deepcopy(_sample(name))


def make_instance(patient: str | None = None, study: str | None = None,
                  series: str | None = None, instance: str | None = None, *,
                  base: str = CT, **attrs: Any) -> FileDataset:
    """A copy of the sample ``base`` as ``patient`` (PatientName) in ``study`` /
    ``series`` with SOP Instance UID ``instance`` (fresh UIDs when None), then every
    DICOM keyword in ``attrs`` set (``PatientID="PID-1"``, ``InstanceNumber=3``)."""
    ds = sample(base)
    if patient is not None:
        ds.PatientName = patient
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = instance or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def write_instances(folder: Path, instances: Iterable[FileDataset], stem: str = "i") -> list[Path]:
    """Each instance as a Part 10 file ``<folder>/<stem><n>.dcm`` (folder created)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(instances):
        p = folder / f"{stem}{n}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
