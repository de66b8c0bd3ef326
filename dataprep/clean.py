"""Text cleaning: one step that makes every document's text canonical before it is judged.

Filters and dedup compare text, so invisible differences (a BOM, a zero-width space, NFD accents,
trailing blanks, CRLF) would make equal documents look different and skew every ratio. The step
is built once from :class:`CleanConfig` (every regex compiled here, never per document) and runs, in
order: line breaks → mojibake repair (optional, ftfy) → Unicode normalization → control and
invisible character removal → blank normalization → boilerplate line removal → blank-line cap →
PII masking → minimum length. ASCII text skips the Unicode work (``str.isascii`` is O(1) in
CPython), and cheap substring tests skip every regex pass that would find nothing.

Zero-width (non-)joiners (U+200C/U+200D) are kept: they are spelling in Persian and Indic scripts
and glue emoji sequences.
"""
from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from .config import CleanConfig
from .stage import Document, Step

# C0 controls except \t and \n, DEL and C1 controls. \r, \v, \f are line breaks and handled apart.
_CONTROL = "\x00-\x08\x0e-\x1f\x7f-\x9f"
# Zero-width space, word joiner, invisible operators, BOM, soft hyphen, bidi marks/embeddings/
# isolates, Arabic letter mark, Mongolian vowel separator, interlinear annotation controls.
_INVISIBLE = "\u200b\u2060-\u2064\ufeff\u00ad\u200e\u200f\u202a-\u202e\u2066-\u2069\u061c\u180e\ufff9-\ufffb"
# Unicode spaces other than U+0020 (NBSP, en/em spaces, narrow NBSP, ideographic space ...).
_UNICODE_SPACES = "\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"

# Line breaks other than \n: CR LF, CR, VT, FF, NEL, line and paragraph separators.
_LINE_BREAKS = re.compile(r"\r\n?|[\x0b\x0c\x85\u2028\u2029]")
_LINE_BREAK_CHARS = ("\r", "\x0b", "\x0c", "\x85", "\u2028", "\u2029")
# Patterns that run on most texts start with a character class or literal, so the regex engine
# scans for it at C speed instead of trying each position (a leading lookbehind defeats that).
_TRAILING_WS = re.compile(r"[ \t]+(?=\n|\Z)")
_LEADING_WS = re.compile(r"(?m)^[ \t]+")
# A run after a non-blank character: a tab, or two or more blanks (leading indentation untouched).
_INNER_WS = re.compile(r"[ \t](?<=[^ \t\n][ \t])(?:(?<=\t)|[ \t])[ \t]*")
_ANY_WS_RUN = re.compile(r"[ \t]{2,}|\t")

# E-mail addresses are found from their "@" (a literal the engine scans for at C speed): the domain
# after it by _EMAIL_DOMAIN, the local part before it by _EMAIL_LOCAL searched backwards.
_EMAIL_DOMAIN = re.compile(r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}\Z")
_EMAIL_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.%+-")
# IPv4 candidates start with a digit (fast scan) not preceded by a word character or a dot and
# are not followed by more of a dotted number; octets are range-checked in code.
_IPV4 = re.compile(r"[0-9](?<![\w.][0-9])[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![\w]|\.\d)")
# Candidates only; ipaddress validates them and a digit is required (so "::", C++ scopes such as
# "std::x" or "a::b", MAC addresses and clock times stay untouched).
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:|:)(?:[0-9A-Fa-f]{0,4}:){1,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")


_GLOBAL_FLAGS = re.compile(r"^\(\?[aiLmsux]+\)")


class _LineScreen:
    """A one-pass test of a whole text that is true whenever some line may match ``pattern``.

    Patterns are meant per line; the screen lets the common case (no line matches) skip the
    per-line loop. A pattern anchored with ``^`` is searched as ``\n`` + rest over ``"\n" + text``
    so that the engine jumps from newline to newline instead of testing ``^`` at every character.
    It may say yes when no line matches (the per-line loop then decides), never the reverse.
    """

    def __init__(self, pattern: str):
        m = _GLOBAL_FLAGS.match(pattern)
        flags, rest = (m.group(0), pattern[m.end():]) if m else ("", pattern)
        self._anchored = rest.startswith("^")
        self._regex = re.compile(flags + r"\n" + rest[1:] if self._anchored else pattern, re.MULTILINE)

    def __call__(self, text: str) -> bool:
        return self._regex.search("\n" + text if self._anchored else text) is not None


class Cleaner:
    """Compiled form of a :class:`CleanConfig`; :meth:`clean` maps one text to its clean form."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self._fix_encoding: Callable[[str], str] | None = None
        if cfg.fix_mojibake:
            try:
                from ftfy import fix_encoding
            except ImportError as exc:  # CleanConfig validation normally catches this first
                raise RuntimeError("clean.fix_mojibake needs the optional package 'ftfy' (pip install ftfy)") from exc
            self._fix_encoding = fix_encoding
        self._form = None if cfg.unicode_form == "none" else cfg.unicode_form
        drop = (_CONTROL if cfg.remove_control_chars else "") + (_INVISIBLE if cfg.remove_invisible_chars else "")
        self._drop_ascii = re.compile(f"[{_CONTROL}]") if cfg.remove_control_chars else None
        self._drop = re.compile(f"[{drop}]") if drop else None
        self._spaces = re.compile(f"[{_UNICODE_SPACES}]") if cfg.normalize_whitespace else None
        self._inner_ws = _INNER_WS if cfg.keep_indentation else _ANY_WS_RUN
        self._max_nl = cfg.max_newlines
        self._newlines = re.compile("\n{%d,}" % (cfg.max_newlines + 1))
        self._nl_run = "\n" * (cfg.max_newlines + 1)
        self._boilerplate = [re.compile(p) for p in cfg.boilerplate_patterns] if cfg.remove_boilerplate_lines else []
        self._boilerplate_screen = [_LineScreen(p) for p in cfg.boilerplate_patterns] if self._boilerplate else []
        self._email_repl = cfg.email_replacement
        self._ip_repl = cfg.ip_replacement

    def clean(self, text: str, counters: Counter) -> str:
        cfg = self.cfg
        ascii_text = text.isascii()
        if cfg.normalize_whitespace and any(c in text for c in (_LINE_BREAK_CHARS[:3] if ascii_text else _LINE_BREAK_CHARS)):
            text = _LINE_BREAKS.sub("\n", text)
        if not ascii_text:
            if self._fix_encoding is not None:
                fixed = self._fix_encoding(text)
                if fixed != text:
                    counters["clean.mojibake_fixed"] += 1
                    text = fixed
            if self._form is not None:
                text = unicodedata.normalize(self._form, text)
            if self._drop is not None:
                text = self._drop.sub("", text)
            if self._spaces is not None:
                text = self._spaces.sub(" ", text)
        elif self._drop_ascii is not None:
            text = self._drop_ascii.sub("", text)
        if cfg.normalize_whitespace:
            # substring tests (C memchr-speed) skip the regex passes that would find nothing
            if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
                text = _TRAILING_WS.sub("", text)
            if not cfg.keep_indentation:
                text = _LEADING_WS.sub("", text)
            if "  " in text or "\t" in text:
                text = self._inner_ws.sub(" ", text)
        if self._boilerplate:
            text = self._remove_boilerplate(text, counters)
        if cfg.normalize_whitespace:
            if self._nl_run in text:
                text = self._newlines.sub("\n" * self._max_nl, text)
            text = text.strip()
        if cfg.mask_emails and "@" in text:
            text = self._mask_emails(text, counters)
        if cfg.mask_ips:
            text = self._mask_ips(text, counters)
        return text

    def _remove_boilerplate(self, text: str, counters: Counter) -> str:
        if not any(screen(text) for screen in self._boilerplate_screen):
            return text
        kept, removed = [], 0
        patterns = self._boilerplate
        for line in text.split("\n"):
            if any(p.search(line) for p in patterns):
                removed += 1
            else:
                kept.append(line)
        if removed:
            counters["clean.boilerplate_lines"] += removed
        return "\n".join(kept)

    def _mask_emails(self, text: str, counters: Counter) -> str:
        parts, last, found = [], 0, 0
        for m in _EMAIL_DOMAIN.finditer(text):
            at = m.start()
            local = _EMAIL_LOCAL.search(text, max(last, at - 64), at)
            if local is None:
                continue
            start = local.start()
            if start > 0 and text[start - 1] in _EMAIL_LOCAL_CHARS:
                continue  # the local part would be longer than 64 characters
            parts += (text[last:start], self._email_repl)
            last = m.end()
            found += 1
        if not found:
            return text
        counters["masked.email"] += found
        parts.append(text[last:])
        return "".join(parts)

    def _mask_ips(self, text: str, counters: Counter) -> str:
        if "." in text:
            found = 0
            repl = self._ip_repl

            def sub4(m: re.Match) -> str:
                nonlocal found
                octets = m.group(0).split(".")
                if all(len(o) == 1 or (o[0] != "0" and int(o) <= 255) for o in octets):
                    found += 1
                    return repl
                return m.group(0)

            text = _IPV4.sub(sub4, text)
            if found:
                counters["masked.ipv4"] += found
        if "::" in text or text.count(":") >= 7:  # an IPv6 address has "::" or 7 colons
            found = 0
            repl = self._ip_repl

            def sub(m: re.Match) -> str:
                nonlocal found
                candidate = m.group(0)
                try:
                    ipaddress.IPv6Address(candidate)
                except ValueError:
                    return candidate
                if not any(c.isdigit() for c in candidate):
                    return candidate  # "::", or hex-letter C++ scopes like "a::b", "add::feed"
                found += 1
                return repl

            text = _IPV6.sub(sub, text)
            if found:
                counters["masked.ipv6"] += found
        return text


def clean_step(cfg: CleanConfig) -> Step:
    """The clean step: cleans each document's text, drops those shorter than ``min_chars`` after.

    Counters: ``dropped.clean.empty_after_clean``, ``masked.{email,ipv4,ipv6}``,
    ``clean.boilerplate_lines``, ``clean.mojibake_fixed``.
    """
    cleaner = Cleaner(cfg)
    min_chars = cfg.min_chars

    def step(docs: Iterable[Document], counters: Counter) -> Iterator[Document]:
        clean = cleaner.clean
        for doc in docs:
            text = clean(doc["text"], counters)
            if len(text) < min_chars or not text:
                counters["dropped.clean.empty_after_clean"] += 1
                continue
            doc["text"] = text
            yield doc

    return step
