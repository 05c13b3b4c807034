"""``edge-agent keys rotate``: a new box KEK, every data key re-wrapped, nothing lost.

Only small wrapped data keys change; no data is re-encrypted.  The steps are
ordered so that a crash (kill -9, power cut) at any point loses nothing and a
second run finishes the job:

1. the current KEK is copied to ``kek.key.old`` (fsynced), then the new KEK
   replaces ``kek.key`` atomically (``write_secret_file``: tmp, fsync, rename,
   fsync dir).  From here on ``KeyEncryptionKey.from_file`` loads both, wraps
   with the new one and unwraps with whichever a wrapped key names, so the
   daemon also starts fine on a half-rotated box;
2. each store re-wraps in its own transaction: inbox study keys, outbox,
   quarantine, result links, audit day keys (the audit skips keys already under
   the new KEK);
3. every store is re-opened with the new KEK *alone* and checked;
4. only then is ``kek.key.old`` deleted and ``key.rotated`` audited.

A run that finds ``kek.key.old`` different from ``kek.key`` resumes at step 2
with the existing new key instead of making a third one.

The daemon must be stopped: it holds the KEK in memory and would wrap new
study keys with the old one.  It takes a shared lock on ``state/daemon.lock``
while it runs; rotation takes it exclusively or refuses.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.audit import AuditLog
from agent.config import Config
from agent.crypto import (
    KeyEncryptionKey,
    fsync_dir,
    load_key_file,
    random_key,
    write_secret_file,
)
from agent.errors import CryptoError, EdgeAgentError, OutOfResources, StorageError
from agent.results.link import LinkStore
from agent.store.inbox import Inbox
from agent.store.quarantine import Quarantine
from agent.uplink import cloudevents
from agent.uplink.outbox import Outbox

LOCK_NAME = "daemon.lock"


def hold_state_lock(state_dir: Path) -> int:
    """A shared lock held by a running daemon for its lifetime; returns the fd.

    Several readers (daemons, CLI tools) may hold it; ``keys rotate`` needs it
    exclusively.  The kernel drops it when the process dies, even on kill -9.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


@contextmanager
def _exclusive(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgeAgentError(
                "the edge-agent daemon is running on this state directory",
                hint="stop it first (systemctl stop edge-agent), rotate, then start it again",
            ) from None
        yield
    finally:
        os.close(fd)


def exclusive_state(state_dir: Path) -> contextlib.AbstractContextManager[None]:
    """The state directory with no daemon running on it (``keys shred-vault`` too)."""
    return _exclusive(state_dir)


def old_kek_path(kek_path: Path) -> Path:
    return kek_path.with_name(kek_path.name + ".old")


def install_new_kek(kek_path: Path) -> tuple[bytes, bytes, bool]:
    """Step 1: (old key, new key, resumed).  Idempotent across crashes."""
    old_path = old_kek_path(kek_path)
    current = load_key_file(kek_path, purpose="key-encryption")
    if old_path.exists():
        previous = load_key_file(old_path, purpose="previous key-encryption")
        if previous != current:
            return previous, current, True  # an earlier rotation got past step 1
    write_secret_file(old_path, current.hex().encode())
    new = random_key()
    write_secret_file(kek_path, new.hex().encode())
    return current, new, False


def _rewrap_stores(cfg: Config, ring: KeyEncryptionKey,
                   new: KeyEncryptionKey) -> tuple[dict[str, int], AuditLog, Outbox]:
    state = cfg.state_dir
    counts: dict[str, int] = {}
    pseudonym = load_key_file(cfg.keys.pseudonym, purpose="pseudonym")
    inbox = Inbox(state / "inbox", ring, pseudonym, cfg.inbox, cfg.study)
    try:
        counts["inbox"] = inbox.rewrap(ring, new)
    finally:
        inbox.close()
    outbox = Outbox(state / "outbox" / "outbox.db", ring, cfg.outbox.max_bytes)
    outbox.rewrap(new)
    counts["outbox"] = 1
    quarantine = Quarantine(state / "quarantine", ring)
    try:
        quarantine.rewrap(new)
        counts["quarantine"] = 1
    finally:
        quarantine.close()
    links_db = state / "results" / "links.db"
    if links_db.exists():  # also when [results] was turned off since: its links stay readable
        links = LinkStore(links_db, ring)
        try:
            counts["results_links"] = links.rewrap(ring, new)
        finally:
            links.close()
    counts.update(_rewrap_results_extra(state, ring, new))
    review_db = state / "review" / "review.db"
    if review_db.exists():
        from agent.review.store import ReviewStore

        review = ReviewStore(review_db, ring)
        try:
            review.rewrap(new)
            counts["review"] = 1
        finally:
            review.close()
    source = f"edge-agent/{cfg.site}/{cfg.device}"

    def publish(data: dict[str, object]) -> None:
        ev = cloudevents.envelope(kind="audit", source=source, data=dict(data))
        try:
            outbox.enqueue("audit", ev["id"], cloudevents.encode(ev))
        except OutOfResources:
            pass  # the checkpoint stays in the audit log and is published later

    audit = AuditLog(state / "audit" / "audit.db", ring, cfg.keys.audit_signing, cfg.audit,
                     box=f"{cfg.site}/{cfg.device}", publish=publish)
    counts["audit"] = audit.rewrap(ring, new)
    return counts, audit, outbox


def _check_only_new(cfg: Config, new: KeyEncryptionKey) -> None:
    """Step 3: every store opens with the new KEK alone (raises otherwise)."""
    state = cfg.state_dir
    index = state / "inbox" / "index.db"
    if index.exists():
        db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT wrapped_key FROM studies WHERE wrapped_key IS NOT NULL").fetchall()
        finally:
            db.close()
        stale = {bytes(r[0])[:16].decode("ascii", "replace") for r in rows} - {new.id}
        if stale:
            raise CryptoError(f"inbox still has data keys wrapped by KEK {sorted(stale)}")
    Outbox(state / "outbox" / "outbox.db", new, cfg.outbox.max_bytes).close()
    Quarantine(state / "quarantine", new).close()
    review_db = state / "review" / "review.db"
    if review_db.exists():
        from agent.review.store import ReviewStore

        ReviewStore(review_db, new).close()
    links_db = state / "results" / "links.db"
    if links_db.exists():
        links = LinkStore(links_db, new)
        try:
            stale = links.wrapped_by() - {new.id}
        finally:
            links.close()
        if stale:
            raise CryptoError(f"result links still have data keys wrapped by KEK {sorted(stale)}")
    _check_results_extra(state, new)


def _rewrap_results_extra(state: Path, ring: KeyEncryptionKey,
                          new: KeyEncryptionKey) -> dict[str, int]:
    """The delivery queue and the pseudonym vault (agent/results/queue.py,
    agent/deid/vault.py): also when turned off since, so what they hold stays readable."""
    from agent.deid.vault import PseudonymVault
    from agent.results.queue import DeliveryQueue

    counts: dict[str, int] = {}
    queue_db = state / "results" / "delivery.db"
    if queue_db.exists():
        q = DeliveryQueue(queue_db, ring)
        try:
            counts["results_queue"] = q.rewrap(ring, new)
        finally:
            q.close()
    vault_db = state / "deid" / "vault.db"
    if vault_db.exists():
        v = PseudonymVault(vault_db, ring)
        try:
            counts["pseudonym_vault"] = v.rewrap(new)
        finally:
            v.close()
    return counts


def _check_results_extra(state: Path, new: KeyEncryptionKey) -> None:
    from agent.deid.vault import PseudonymVault
    from agent.results.queue import DeliveryQueue

    queue_db = state / "results" / "delivery.db"
    if queue_db.exists():
        q = DeliveryQueue(queue_db, new)
        try:
            stale = q.wrapped_by() - {new.id}
        finally:
            q.close()
        if stale:
            raise CryptoError(f"the results queue still has data keys wrapped by KEK "
                              f"{sorted(stale)}")
    vault_db = state / "deid" / "vault.db"
    if vault_db.exists():
        PseudonymVault(vault_db, new).close()  # opens only when its key unwraps under new


def rotate_keys(cfg: Config, *, user: str | None = None) -> dict[str, int]:
    """Rotate the box KEK; returns how many data keys each store re-wrapped.

    Raises EdgeAgentError (the daemon is running, a key file is unreadable, a
    store is damaged); the old KEK is then kept and a re-run resumes.
    """
    kek_path = cfg.keys.kek
    with _exclusive(cfg.state_dir):
        old_key, new_key, resumed = install_new_kek(kek_path)
        new = KeyEncryptionKey(new_key)
        ring = KeyEncryptionKey(new_key, (old_key,))
        old_id = KeyEncryptionKey(old_key).id
        try:
            counts, audit, outbox = _rewrap_stores(cfg, ring, new)
        except (OSError, ValueError) as exc:
            raise StorageError(f"key rotation stopped: {exc}",
                               hint="fix the cause and run 'edge-agent keys rotate' again; "
                                    "the previous KEK is kept until it completes") from None
        try:
            _check_only_new(cfg, new)
            old_path = old_kek_path(kek_path)
            old_path.unlink()
            fsync_dir(old_path.parent)
            audit.record("key.rotated", user=user or _unix_user(), details={
                "old_kek": old_id, "new_kek": new.id, "resumed": resumed, **counts})
            audit.checkpoint()
        finally:
            audit.close()
            outbox.close()
    counts["resumed"] = int(resumed)
    return counts


def _unix_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"
