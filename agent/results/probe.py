"""`edge-agent doctor`: can this box deliver results to each configured PACS?

A real association per destination, as the sender opens it (our AE title, DICOM
TLS when configured), proposing Verification, the SOP classes of the result
objects and, where configured, Storage Commitment; a C-ECHO proves the peer
answers.  Nothing is stored.
"""

from __future__ import annotations

from pydicom.uid import UID
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    EnhancedSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    StorageCommitmentPushModel,
    Verification,
)

from agent.config import Config, ResultDestination
from agent.results.scu import Link

# What each kind is sent as (agent/results/*.py).
KIND_SOP_CLASSES: dict[str, tuple[UID, ...]] = {
    "sr": (Comprehensive3DSRStorage, EnhancedSRStorage),
    "gsps": (GrayscaleSoftcopyPresentationStateStorage,),
    "sc": (SecondaryCaptureImageStorage,),
    "seg": (SegmentationStorage,),
}


def probe(cfg: Config, dest: ResultDestination) -> tuple[bool, str, str]:
    """(ok, what was found, how to fix it)."""
    classes = {str(Verification)} | {str(u) for k in dest.kinds for u in KIND_SOP_CLASSES[k]}
    link = Link(dest, cfg.dicom.ae_title, classes, commitment=dest.storage_commitment,
                connect_timeout=cfg.results.connect_timeout_seconds,
                dimse_timeout=cfg.results.connect_timeout_seconds)
    if not link.open():
        return False, f"{dest.describe()}: {link.error}", (
            "check host/port/ae_title of this destination, the firewall, and that the PACS "
            f"knows this box as AE {cfg.dicom.ae_title} (docs/operator-guide.md, "
            "'Connect a PACS')")
    try:
        assert link.assoc is not None
        rsp = link.assoc.send_c_echo()
        status = rsp.get("Status") if rsp is not None else None
        if status is None or int(status) != 0:
            return False, f"{dest.describe()}: C-ECHO not answered with Success", \
                "check the PACS log for why it refused the echo"
        missing = sorted(k for k in dest.kinds
                         if not any(link.accepts(str(u)) for u in KIND_SOP_CLASSES[k]))
        if dest.storage_commitment and not link.accepts(str(StorageCommitmentPushModel)):
            return False, f"{dest.describe()}: does not offer Storage Commitment", \
                "set storage_commitment = false (release_after = 'success') or enable " \
                "storage commitment on the PACS"
        if missing:
            return False, f"{dest.describe()}: does not accept {', '.join(missing)}", \
                "allow these SOP classes on the PACS or remove them from kinds"
        tls = " over DICOM TLS" if dest.tls.enabled else ""
        return True, f"{dest.describe()}: C-ECHO ok{tls}, accepts {', '.join(sorted(dest.kinds))}" \
            + (", storage commitment offered" if dest.storage_commitment else ""), ""
    finally:
        link.close()
