"""The clean step: each transformation on its own, and the step's drop rule and counters."""
from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
from pydantic import ValidationError

from shardflow.dataprep.clean import Cleaner, clean_step
from shardflow.dataprep.config import CleanConfig


def clean(text: str, **cfg) -> tuple[str, Counter]:
    counters: Counter = Counter()
    return Cleaner(CleanConfig(**cfg)).clean(text, counters), counters


@pytest.mark.parametrize("form,text,expected", [
    ("NFC", "cafe\u0301", "caf\u00e9"),
    ("NFC", "\ufb01le", "\ufb01le"),  # NFC keeps compatibility ligatures
    ("NFKC", "\ufb01le \u2460 \uff21", "file 1 A"),
    ("none", "cafe\u0301", "cafe\u0301"),
])
def test_unicode_normalization(form, text, expected):
    assert clean(text, unicode_form=form)[0] == expected


def test_control_characters_removed_but_tab_and_newline_kept():
    text = "a\x00b\x07c\td\x1be\x7ff\x85g\u0080h\ni"
    assert clean(text, normalize_whitespace=False)[0] == "abc\td" + "efg" + "h\ni"
    assert clean(text, remove_control_chars=False, normalize_whitespace=False)[0] == text
    # ASCII-only text takes the fast path and still loses its controls
    assert clean("x\x00y\x1fz", normalize_whitespace=False)[0] == "xyz"


def test_invisible_characters_removed_joiners_kept():
    text = "\ufeffzero\u200bwidth soft\u00adhyphen \u202eRTL\u202c \u2066iso\u2069 emoji\u200d\U0001F4BB fa\u200cx"
    out, _ = clean(text)
    assert out == "zerowidth softhyphen RTL iso emoji\u200d\U0001F4BB fa\u200cx"
    assert clean(text, remove_invisible_chars=False)[0] == text


def test_whitespace_normalization():
    text = "  title  \r\n\r\nword\u00a0\u00a0and\t\tmore   words   \n\n\n\n\nafter\u2028line\n    indented  code  \n"
    out, _ = clean(text)
    assert out == "title\n\nword and more words\n\nafter\nline\n    indented code"
    out, _ = clean(text, keep_indentation=False)
    assert out.endswith("after\nline\nindented code")
    out, _ = clean(text, max_newlines=1)
    assert "\n\n" not in out
    assert clean("a  b \n", normalize_whitespace=False)[0] == "a  b \n"


def test_boilerplate_lines_removed():
    text = ("Intro paragraph about things.\nAll rights reserved 2024.\nPrevious | Next | Home\n"
            "A sentence mentioning the privacy policy in passing stays.\nClick here to subscribe\nEnd.")
    out, counters = clean(text)
    assert out == "Intro paragraph about things.\nA sentence mentioning the privacy policy in passing stays.\nEnd."
    assert counters["clean.boilerplate_lines"] == 3
    custom, counters = clean("keep\nDROP ME\nkeep too", boilerplate_patterns=[r"^DROP"])
    assert custom == "keep\nkeep too" and counters["clean.boilerplate_lines"] == 1
    assert clean(text, remove_boilerplate_lines=False)[0].count("\n") == 5
    # a document that matches nowhere is returned untouched (the screen skips the line loop)
    assert clean("Nothing to see.\nReally.")[0] == "Nothing to see.\nReally."


def test_invalid_boilerplate_pattern_is_a_config_error():
    with pytest.raises(ValidationError, match=r"boilerplate_patterns\[0\]"):
        CleanConfig(boilerplate_patterns=["(unclosed"])


def test_pii_masking():
    text = ("Mail john.doe+x@example.co.uk or ops@mail.example.org. Hosts 192.168.0.1 and 10.0.0.255; "
            "v6 2001:db8::8a2e:370:7334 and ::1 and fe80::1. Not IPs: version 1.2.3, 999.1.1.1, "
            "std::vector, 12:30:45, a::b, MAC 00:1a:2b:3c:4d:5e, ratio 3:2, user@localhost.")
    out, counters = clean(text, mask_emails=True, mask_ips=True)
    assert out == ("Mail <EMAIL> or <EMAIL>. Hosts <IP> and <IP>; v6 <IP> and <IP> and <IP>. Not IPs: "
                   "version 1.2.3, 999.1.1.1, std::vector, 12:30:45, a::b, MAC 00:1a:2b:3c:4d:5e, ratio 3:2, "
                   "user@localhost.")
    assert counters == Counter({"masked.email": 2, "masked.ipv4": 2, "masked.ipv6": 3})
    out, counters = clean(text)
    assert out == text and not counters
    out, _ = clean("write to a@b.io", mask_emails=True, email_replacement="[email]")
    assert out == "write to [email]"


@pytest.mark.skipif(importlib.util.find_spec("ftfy") is None, reason="ftfy (optional) not installed")
def test_mojibake_repair_with_ftfy():
    out, counters = clean("The caf\u00c3\u00a9 serves cr\u00c3\u00a8me br\u00c3\u00bbl\u00c3\u00a9e.", fix_mojibake=True)
    assert out == "The caf\u00e9 serves cr\u00e8me br\u00fbl\u00e9e."
    assert counters["clean.mojibake_fixed"] == 1
    assert clean("caf\u00c3\u00a9")[0] == "caf\u00c3\u00a9"  # off by default


def test_mojibake_without_ftfy_is_a_clear_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ftfy" else real(name, *a))
    with pytest.raises(ValidationError, match="ftfy"):
        CleanConfig(fix_mojibake=True)
    CleanConfig(fix_mojibake=False)  # fine without it


def test_step_drops_documents_empty_after_cleaning_and_counts():
    docs = [
        {"id": "1", "text": "  Real text.  ", "source": "s", "meta": {}},
        {"id": "2", "text": "\u200b\ufeff \n\t", "source": "s", "meta": {}},
        {"id": "3", "text": "short", "source": "s", "meta": {}},
        {"id": "4", "text": "Copyright notice.\nAll rights reserved.", "source": "s", "meta": {}},
    ]
    counters: Counter = Counter()
    out = list(clean_step(CleanConfig(min_chars=6))(iter(docs), counters))
    assert [(d["id"], d["text"]) for d in out] == [("1", "Real text."), ("4", "Copyright notice.")]
    assert counters["dropped.clean.empty_after_clean"] == 2
    assert counters["clean.boilerplate_lines"] == 1


def test_clean_is_idempotent_on_its_output():
    text = "A\u00a0 b\r\n\r\n\r\nc\u200b d\t\te  \nf"
    once, _ = clean(text, mask_ips=True, mask_emails=True)
    assert clean(once, mask_ips=True, mask_emails=True)[0] == once
