"""The one-pass egress guard blocks exactly what the old guard blocked, for the same
reason: both run over a large seeded random corpus of payloads, with and without
planted PHI, one by one and in random batches (``check_many``), and every answer
must be equal.  The old guard is kept verbatim in tests/helpers/egress_reference.py.

The corpus is built to reach every branch of the guard: valid and broken
CloudEvent envelopes, the box's own words and templates (with study values in
their holes), box-made tokens and numbers equal to study values, free text with
values in every spelling (dates, case, whitespace, name components, inside words,
short components as words), the PHI patterns and near misses of each, non-JSON
text and undecodable bytes.  It asserts that every kind of answer occurs often, so
it cannot pass on a corpus that misses a branch.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

from agent.types import PhiFingerprint
from agent.uplink import cloudevents, egress, vocabulary
from tests.helpers import egress_reference as reference

SEED = 19_4
N = 12_000
NOW = time.time()

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ACCENTED = "üéøßçñ"
_WORDS = ("lesion", "probability", "review", "model", "slice", "frame", "none", "rule", "left",
          "right", "image", "score", "region", "mm", "ok", "see", "note", "bob", "li", "wu")


def _word(rng: random.Random, lo: int = 2, hi: int = 9) -> str:
    w = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))
    if rng.random() < 0.1:
        w = w[:1] + rng.choice(_ACCENTED) + w[1:]
    return w.capitalize() if rng.random() < 0.5 else w.upper()


def _uid(rng: random.Random, root: str = "1.2.840.113619.2.55.3") -> str:
    return root + "".join(f".{rng.randint(0, 99999)}" for _ in range(rng.randint(1, 5)))


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1920, 2026)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"


def _fingerprint(rng: random.Random) -> PhiFingerprint:
    r = rng.random()
    if r < 0.1:
        return PhiFingerprint()
    values: set[str] = set()
    family, given = _word(rng), _word(rng)
    if rng.random() < 0.3:
        family, given = rng.choice([("Li", "Wu"), ("None", "Bob"), ("Ng", "Al")])
    name = f"{family}^{given}" + (f"^{_word(rng)}" if rng.random() < 0.3 else "")
    values |= {name, family, given}
    values.add(f"PID-{rng.randint(0, 10**6)}")
    values.add(str(rng.randint(1000, 99999)))  # a numeric id ("4711")
    values.add(_date(rng))
    study = _uid(rng)
    values.add(study)
    values |= {f"{study}.{k}" for k in range(rng.randint(0, 40))}
    if rng.random() < 0.3:
        values.add(f"{_word(rng)} {_word(rng)}  Hospital")  # inner whitespace
    if rng.random() < 0.2:
        values.add(rng.choice(_WORDS))  # a value that is also a common word
    if rng.random() < 0.05:
        # Hundreds of values each branching off the last: deeper than re's parser goes.
        values |= {"q" * k + "z" for k in range(4, 1200)}
    return PhiFingerprint(frozenset(values))


def _spelling(rng: random.Random, value: str) -> str:
    """``value`` as it might leak: another case, spacing, date form, a component."""
    v = value
    if len(v) == 8 and v.isdigit() and rng.random() < 0.6:
        y, m, d = v[:4], v[4:6], v[6:]
        v = rng.choice([f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{m}/{d}/{y}", f"{d}.{m}.{y}"])
    if "^" in v and rng.random() < 0.5:
        v = rng.choice(v.split("^"))
    if rng.random() < 0.3:
        v = v.lower() if rng.random() < 0.5 else v.upper()
    if " " in v and rng.random() < 0.5:
        v = v.replace(" ", rng.choice(["  ", "\t", "\n ", " "]))
    if rng.random() < 0.2 and len(v) > 5:
        v = v[:-1]  # a near miss
    return v


_PATTERN_TEXTS = (
    "Doe^Jane", "o'Neil^Ann", "-ab^c", "ab^c", "a^b", "x^", "'ab^c", "Ab-cd^E", "ab ^c",
    "078-05-1120", "123-45-678", "1234-56-7890", "a078-05-1120", "078-05-1120a", "x-12-3456",
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.77", "1.2.3.4.5",
    "1.3.6.1.4.1.9590.100", "x1.2.840.1.2.3", "1.2.3.4.555-12-1234", "11.2.3.4.5.6",
    "1.2.840.10008.1.2.1", "1.2.3", "٠٧٨-٠٥-١١٢٠",
)


def _free(rng: random.Random, g: PhiFingerprint, plant: bool) -> str:
    parts = [rng.choice(_WORDS) if rng.random() < 0.7 else _word(rng)
             for _ in range(rng.randint(0, 12))]
    if rng.random() < 0.05:
        parts.append(rng.choice(_LETTERS) * rng.randint(200, 1500))  # a long letter run
    r = rng.random()  # plant a study value, a pattern, or (sometimes) both
    if plant and g.values and (r < 0.4 or r > 0.85):
        v = _spelling(rng, rng.choice(sorted(g.values)))
        if rng.random() < 0.3:
            v = rng.choice(_LETTERS) + v + rng.choice(_LETTERS)  # inside a word
        parts.insert(rng.randint(0, len(parts)), v)
    if plant and r >= 0.4:
        parts.insert(rng.randint(0, len(parts)), rng.choice(_PATTERN_TEXTS))
    sep = rng.choice([" ", " ", " ", "  ", ", ", "\n", "; "])
    text = sep.join(parts)
    return f" {text} " if rng.random() < 0.1 else text


def _number(rng: random.Random, g: PhiFingerprint, plant: bool) -> object:
    nums = [v for v in g.values if v.isdigit()]
    if plant and nums and rng.random() < 0.4:
        n = int(rng.choice(nums))
        return float(n) if rng.random() < 0.3 else n
    return rng.choice([rng.randint(0, 10**6), round(rng.random(), 4), True, None, 0.5])


def _template(rng: random.Random, g: PhiFingerprint, plant: bool) -> str:
    hole = _free(rng, g, plant) or "lesion"
    num = float(rng.choice([v for v in g.values if v.isdigit()] or ["3"])) \
        if plant and rng.random() < 0.3 else rng.random()
    return rng.choice([
        vocabulary.REVIEW_BAND.format(p=num, low=0.3, high=0.7),
        vocabulary.WHERE_FRAME.format(image=rng.randint(0, 9), frame=rng.randint(0, 9)),
        vocabulary.NO_REGION.format(where=hole, label=rng.choice(["lesion", hole]), score=0.4),
        vocabulary.REGION_ABOVE.format(label=hole, where="image 1", x=3, y=4, w=5, h=6,
                                       score=0.9, drop=0.2),
        vocabulary.CAM_REGION_BELOW.format(label="lesion", where=hole, x=3, y=4, w=5, h=6,
                                           score=0.2),
        "probability " + hole,
    ])


def _token(rng: random.Random, g: PhiFingerprint, plant: bool) -> str:
    uids = [v for v in g.values if v.startswith("1.2.840.113619")]
    if plant and uids and rng.random() < 0.3:
        return rng.choice(uids)  # a study UID where a token would be
    return rng.choice([f"2.25.{rng.randint(0, 10**38)}", f"{rng.getrandbits(64):016x}",
                       cloudevents.stable_id("diff", str(rng.random())),
                       f"{rng.getrandbits(128):032X}"])


def _data(rng: random.Random, g: PhiFingerprint, plant: bool, depth: int = 0) -> object:
    r = rng.random()
    if depth < 3 and r < 0.25:
        return {_key(rng, g, plant): _data(rng, g, plant, depth + 1)
                for _ in range(rng.randint(0, 5))}
    if depth < 3 and r < 0.35:
        return [_data(rng, g, plant, depth + 1) for _ in range(rng.randint(0, 4))]
    if r < 0.5:
        return _free(rng, g, plant)
    if r < 0.6:
        return _template(rng, g, plant)
    if r < 0.7:
        return _token(rng, g, plant)
    if r < 0.85:
        return _number(rng, g, plant)
    return rng.choice([*vocabulary.RESULT_KEYS, *vocabulary.QUARANTINE.values(),
                       *vocabulary.STATUSES, "ExplicitVRLittleEndian", "1.2.840.10008.1.2.1"])


def _key(rng: random.Random, g: PhiFingerprint, plant: bool) -> str:
    if plant and rng.random() < 0.1:
        return _free(rng, g, plant)
    return rng.choice(vocabulary.RESULT_KEYS)


def _payload(rng: random.Random, g: PhiFingerprint) -> tuple[bytes, float | None]:
    plant = rng.random() < 0.5
    made_at = NOW if rng.random() < 0.8 else None
    r = rng.random()
    if r < 0.75:
        when = datetime.fromtimestamp(NOW, UTC)
        if rng.random() < 0.05:
            when -= timedelta(days=rng.choice([1, 400]))
        data = {k: _data(rng, g, plant, 1) for k in rng.sample(vocabulary.RESULT_KEYS, 4)}
        ev = cloudevents.envelope(kind=rng.choice(["result", "audit.events", "telemetry"]),
                                  source="edge-agent/dev-site/dev-box", data=data,
                                  event_id=cloudevents.stable_id("d", str(rng.random())),
                                  subject=_free(rng, g, plant) if rng.random() < 0.2 else None,
                                  time=when)
        if rng.random() < 0.1:
            ev[_key(rng, g, plant) + "ext"] = _data(rng, g, plant, 2)  # an extension attribute
        if rng.random() < 0.05:
            broken = rng.choice(["id", "time", "source", "type", "specversion"])
            ev[broken] = rng.choice(["", "x", _free(rng, g, plant), 7])
        return cloudevents.encode(ev) if rng.random() < 0.7 else \
            json.dumps(ev, ensure_ascii=False).encode(), made_at
    if r < 0.85:
        return json.dumps(_data(rng, g, plant)).encode(), made_at  # JSON, not a CloudEvent
    if r < 0.95:
        return _free(rng, g, plant).encode(), made_at  # plain text
    return b"\xff\xfe" + _free(rng, g, plant).encode("utf-16-le"), made_at  # not UTF-8


def _corpus() -> list[tuple[bytes, PhiFingerprint, float | None]]:
    rng = random.Random(SEED)
    prints = [_fingerprint(rng) for _ in range(60)]
    out = []
    for _ in range(N):
        g = rng.choice(prints)
        payload, made_at = _payload(rng, g)
        out.append((payload, g, made_at))
    return out


def test_the_one_pass_guard_blocks_exactly_what_the_old_guard_blocked() -> None:
    corpus = _corpus()
    expected = [reference.check(p, g, made_at=m) for p, g, m in corpus]
    kinds = Counter(h.kind if h else "pass" for h in expected)
    # The corpus reaches every answer, often: a test that cannot fail proves nothing.
    for kind in ("pass", "study-value", "envelope", "person-name", "ssn", "dicom-uid"):
        assert kinds[kind] >= 100, (kind, kinds)

    for (p, g, m), want in zip(corpus, expected, strict=True):
        assert egress.check(p, g, made_at=m) == want, (p[:300], want)

    rng = random.Random(SEED + 1)
    i = 0
    while i < len(corpus):
        size = rng.choice([1, 2, 7, 32, 100])
        assert egress.check_many(corpus[i:i + size]) == expected[i:i + size], i
        i += size
