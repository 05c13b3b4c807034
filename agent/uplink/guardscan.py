"""One pass over many texts for the egress guard: which texts hold a study value or a
PHI pattern.

The guard (agent/uplink/egress.py) used to search every free-text string of a payload once
per study value (``needle in text`` for each of up to hundreds of values: a study's
names, ids, dates and the UIDs of its instances) and then once per pattern, from
Python, one string at a time.  Here the texts of a whole batch of payloads are
joined and searched together:

* the study values of one fingerprint are compiled once (``ValueMatcher``, cached
  by the caller) into a single regular expression shaped as a trie of the values:
  at each position of the text at most one branch per character is followed, so a
  search costs the length of the text times at most the length of the longest value,
  whatever the number of values.  A value that has a shorter value as its prefix
  is dropped from the trie (finding the shorter one already answers "is any value
  in this text").  The short name components that are searched as whole words are
  one more alternative of the same expression;
* each PHI pattern runs once over all the texts of the batch.

Why joining is exact: texts are joined with a newline, which no value contains
(values are whitespace-normalised: their only whitespace is single spaces) and no
pattern can match across (none of their character classes holds it); at a newline
the patterns' look-arounds and word boundaries see what they would see at the start
or end of a string.  So a text has a hit in the joined search exactly when it has
one on its own.  The differential test against the old guard (tests/mqtt/
test_guard_differential.py) checks this on a large random corpus.

Why our own construction instead of an Aho-Corasick library: the values of one
study number in the tens to hundreds and are at most a few hundred characters; the
trie expression runs inside ``re``'s C matcher (which also skips positions no value
can start at) and needs no new dependency on the box.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# No value and no pattern match contains it (see the module doc).
SEP = "\n"


def _trie(words: Iterable[str]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for w in sorted(set(words), key=len):
        node = root
        for ch in w:
            if "" in node:
                break  # a shorter word is a prefix of this one: it already answers
            node = node.setdefault(ch, {})
        else:
            node.clear()
            node[""] = {}
    return root


def _trie_source(node: dict[str, Any]) -> str:
    # Single-child chains are plain literals; only branch points nest a group.
    out = []
    while "" not in node and len(node) == 1:
        ((ch, node),) = node.items()
        out.append(re.escape(ch))
    if "" not in node:
        out.append("(?:" + "|".join(re.escape(ch) + _trie_source(child)
                                    for ch, child in sorted(node.items())) + ")")
    return "".join(out)


def _word_source(w: str) -> str:
    # The word, then "not preceded by a letter or digit" as a look-behind of fixed
    # width after it, so every alternative starts with a literal (re then skips the
    # positions no alternative can start at), and "not followed by one".
    e = re.escape(w)
    return f"{e}(?<![a-z0-9]{e})(?![a-z0-9])"


@dataclass(frozen=True)
class ValueMatcher:
    """The study values of one fingerprint, compiled once.

    ``regexes`` run on whitespace-normalised lower-case text: a match of any is a
    ``long`` value anywhere, or a short component as a whole word (not inside a run
    of letters and digits).  Usually one expression; more only when the values nest
    too deep for one (see ``_compile_words``).
    """

    long: frozenset[str]
    regexes: tuple[re.Pattern[str], ...]


def _compile_words(words: list[str]) -> list[re.Pattern[str]]:
    """``words`` (sorted) as few trie expressions as re's parser can take.

    Values that each branch off the previous one ("qqqqz", "qqqqqz", ...) nest one
    group per value, deeper than Python's recursion goes; halves of the sorted list
    nest half as deep, so the split ends after a few steps with expressions that
    each still cover many values.
    """
    try:
        return [re.compile(_trie_source(_trie(words)))]
    except (RecursionError, re.error, OverflowError):
        if len(words) == 1:
            return [re.compile(re.escape(words[0]))]
        mid = len(words) // 2
        return _compile_words(words[:mid]) + _compile_words(words[mid:])


def compile_values(long: frozenset[str], short: frozenset[str]) -> ValueMatcher:
    """``long`` values anywhere, ``short`` ones as whole words."""
    words = sorted(w for w in long if w)
    regexes = _compile_words(words) if words else []
    if short := frozenset(w for w in short if w):
        regexes.append(re.compile("|".join(_word_source(w) for w in sorted(short))))
    return ValueMatcher(long, tuple(regexes))


Accept = Callable[[str], bool]


@dataclass(frozen=True)
class Pattern:
    """A PHI pattern; ``accept`` may reject a match (a standard UID is public).

    ``needs``: a text every match contains ("^" in a person name), so a batch without
    it is not searched at all (``in`` is a C scan, far cheaper than a regex search).
    Only whether a text has a match counts, and for an ``accept``-ed pattern which
    text was matched: a regex written to start at its rarest literal (for re's fast
    prefix search) is fine as long as it matches the same texts.
    """

    name: str
    regex: re.Pattern[str]
    accept: Accept | None = None
    needs: str | None = None


def _owner(starts: Sequence[int], pos: int) -> int:
    return bisect_right(starts, pos) - 1


def _joined(texts: Sequence[str]) -> tuple[str, list[int]]:
    starts = []
    pos = 0
    for t in texts:
        starts.append(pos)
        pos += len(t) + 1
    return SEP.join(texts), starts


# ASCII control characters: every ASCII character str.split() splits on other than the
# space (tab, newline, \x0b-\x0d, \x1c-\x1f) is one.
_CONTROL = bytes([*range(0x20), 0x7F])


def norm(s: str) -> str:
    """Whitespace-normalised lower case: how values and texts are compared."""
    if _single_spaced_ascii(s):
        # Most texts: the same result without a list of words.
        return s.strip(" ").lower()
    return " ".join(s.strip().lower().split())


def _single_spaced_ascii(s: str) -> bool:
    if not s.isascii() or "  " in s:
        return False
    # No control character: deleting them changes nothing (one C pass over the bytes,
    # five times faster than str.isprintable on a 1.5 kB text).
    b = s.encode("ascii")
    return len(b.translate(None, _CONTROL)) == len(b)


class TextBatch:
    """Free texts, each with the matcher of its study, scanned together by ``kinds``."""

    def __init__(self) -> None:
        self._texts: list[str] = []
        self._matchers: list[ValueMatcher] = []

    def __len__(self) -> int:
        return len(self._texts)

    def add(self, text: str, matcher: ValueMatcher) -> int:
        """Queue ``text``; returns its index into ``kinds()``."""
        self._texts.append(text)
        self._matchers.append(matcher)
        return len(self._texts) - 1

    def kinds(self, patterns: Sequence[Pattern], value_kind: str) -> list[str | None]:
        """Per text: ``value_kind`` when a study value is in it, else the name of the
        first of ``patterns`` (in their order) with an accepted match, else None."""
        n = len(self._texts)
        out: list[str | None] = [None] * n
        if not n:
            return out
        # Study values: one search per distinct matcher over its texts, normalised.
        groups: dict[int, tuple[ValueMatcher, list[int]]] = {}
        for i, m in enumerate(self._matchers):
            if m.regexes:
                groups.setdefault(id(m), (m, []))[1].append(i)
        for m, idx in groups.values():
            normed = [norm(self._texts[i]) for i in idx]
            for regex in m.regexes:
                text, starts = _joined(normed)
                pos = 0
                while (hit := regex.search(text, pos)) is not None:
                    k = _owner(starts, hit.start())
                    out[idx[k]] = value_kind
                    # One hit per text is enough: go on at the next text.
                    if k + 1 >= len(starts):
                        break
                    pos = starts[k + 1]
                # The next expression searches only the texts still clean.
                keep = [k for k, i in enumerate(idx) if out[i] is None]
                if not keep:
                    break
                idx, normed = [idx[k] for k in keep], [normed[k] for k in keep]
        # Patterns: one search each over every text still clean.
        todo = [i for i in range(n) if out[i] is None]
        for p in patterns:
            if not todo:
                break
            text, starts = _joined([self._texts[i] for i in todo])
            if p.needs is not None and p.needs not in text:
                continue
            found: set[int] = set()
            for hit in p.regex.finditer(text):
                if p.accept is None or p.accept(hit.group()):
                    found.add(_owner(starts, hit.start()))
            for k in found:
                out[todo[k]] = p.name
            todo = [i for k, i in enumerate(todo) if k not in found]
        return out
