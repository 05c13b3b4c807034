"""What the tests share, in one package: ``from tests.helpers import ...``.

The repository root is on ``sys.path`` through ``pythonpath = ["."]`` in pyproject's
pytest settings (the one mechanism; no test folder edits ``sys.path``).

- ``waiting``: ``free_port``, ``wait_for`` (monotonic clock), ``wait_port``
- ``peers``: the real peers: a provisioned dev box, its mutual-TLS mosquitto, the
  daemon as a subprocess, an ops subscriber, storescu, ``require_peer``
- ``dicom``: ``make_instance(patient, study, series, instance, **attrs)`` and
  ``write_instances``: test instances from pydicom's samples
- by area: ``mqtt``, ``ops``, ``audit``, ``syslog_collector``, ``fleet``, ``infer``,
  ``results``, ``faults`` (kill -9 rounds), ``deid``, ``deid_canary``, ``debroot``
  (a clean Debian root for the package tests)

The common names are re-exported here.
"""

from tests.helpers.dicom import make_instance, sample, write_instances
from tests.helpers.peers import (
    EDGE_AGENT,
    PEERS,
    REPO,
    Box,
    Broker,
    Daemon,
    Received,
    Subscriber,
    audit_events,
    find_peer,
    in_ci,
    missing,
    provision,
    require_peer,
    set_config,
    storescu,
)
from tests.helpers.waiting import free_port, wait_for, wait_port

__all__ = [
    "EDGE_AGENT", "PEERS", "REPO", "Box", "Broker", "Daemon", "Received", "Subscriber",
    "audit_events", "find_peer", "free_port", "in_ci", "make_instance", "missing", "provision",
    "require_peer", "sample", "set_config", "storescu", "wait_for", "wait_port",
    "write_instances",
]
