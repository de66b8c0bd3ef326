"""The demo corpus builder (tools/demo_corpus/): its extraction helpers, the provenance it
writes, and (slow, where the recorded package versions are installed) a byte-identical rebuild.

The builder is tooling outside the installed package; it is imported from the repository root,
which pytest puts on sys.path for this test package (tests/ is a package, its parent the rootdir).
"""
from __future__ import annotations

import json
import re
import shutil

import pytest

from shardflow.dataprep.demo_corpus import DEMO_CORPUS_PATH, PROVENANCE_PATH, read_demo_corpus
from tools.demo_corpus import blocks as bk
from tools.demo_corpus import build, plant, sources, text_formats


@pytest.fixture(scope="module")
def records() -> list[dict]:
    out = []
    for line in read_demo_corpus().splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("source"), str):
            out.append(obj)
    return out


def _shingles(text: str, k: int = 3) -> set[tuple[str, ...]]:
    w = text.split()
    return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}


def test_near_duplicates(records):
    """The shipped corpus carries near duplicates at every edit rate the builder plants."""
    by_id = {r["id"]: r for r in records}
    near = [r for r in records if r["meta"].get("planted") == "near_dup"]
    assert len(near) >= 0.015 * len(records)
    assert {r["meta"]["edit_rate"] for r in near} == set(build.NEAR_DUP_RATES)
    for r in near:
        orig = by_id[r["meta"]["dup_of"]]
        assert r["text"] != orig["text"]
        a, b = _shingles(orig["text"]), _shingles(r["text"])
        jac = len(a & b) / len(a | b)
        assert 0.55 <= jac < 1.0, (r["id"], jac)
        assert 0.005 <= r["meta"]["words_edited"] <= 0.08


def test_sources_are_documented_in_provenance(records):
    prov = PROVENANCE_PATH.read_text(encoding="utf-8")
    table = re.findall(r"^\| ([a-z0-9][a-z0-9.+-]+) \| ([^|]+) \|", prov, flags=re.M)
    listed = {pkg for pkg, _ in table}
    assert set(sources.DEMO_PACKAGES) <= listed
    assert {r["source"].split("/", 1)[0] for r in records} <= listed
    assert "python tools/demo_corpus/build.py build" in prov


# -- the extraction helpers ---------------------------------------------------------------

PAGE = """<html><head><title>T</title><script>var x = 1;</script></head><body>
<div class="related" role="navigation"><a href="#">index</a> | <a href="#">next</a></div>
<div class="body" role="main">
<h1>Title<a class="headerlink" href="#">¶</a></h1>
<p>First   paragraph
 spans lines.</p>
<ul><li><p>item one</p></li><li>item two</li></ul>
<pre>  code
    indented</pre>
<h2>Second</h2><p>More text &amp; entities.</p>
</div><div class="footer">© footer</div></body></html>"""


def test_html_to_blocks_keeps_content_only():
    blocks = bk.html_to_blocks(PAGE, main=("role", "main"))
    assert blocks == [
        ("h", "Title", 1),
        ("p", "First paragraph spans lines.", 0),
        ("li", "- item one", 0),
        ("li", "- item two", 0),
        ("pre", "  code\n    indented", 0),
        ("h", "Second", 2),
        ("p", "More text & entities.", 0),
    ]
    assert bk.html_fragment_text(PAGE, "class", "footer") == "© footer"


def test_split_blocks_bounds_sizes():
    para = ("p", "word " * 400, 0)
    blocks = [("h", "A", 1), para, ("h", "B", 2)] + [para] * 30 + [("h", "C", 2), ("p", "x", 0)]
    docs = bk.split_blocks(blocks, split_level=2)
    assert docs[0].startswith("A") and all(len(d.encode()) <= bk.MAX_DOC_BYTES for d in docs)
    assert "".join(docs).count("word") == 31 * 400


def test_near_duplicate_is_deterministic_and_bounded():
    text = " ".join(f"w{i % 97} alpha beta" for i in range(300))
    a, ra = plant.make_near_duplicate(text, 0.03, plant.seeded_rng("x"))
    b, rb = plant.make_near_duplicate(text, 0.03, plant.seeded_rng("x"))
    assert a == b and ra == rb and a != text
    assert 0.02 <= ra <= 0.04


def test_man_and_pod_readers():
    man = ('.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n'
           '.B ls\nlists \\fIfiles\\fR.\n.PP\nSecond para.\n')
    assert text_formats.man_to_blocks(man) == [("h", "LS(1)", 1), ("h", "NAME", 2),
                                     ("p", "ls - list directory contents", 0),
                                     ("h", "DESCRIPTION", 2), ("p", "ls lists files.", 0),
                                     ("p", "Second para.", 0)]
    assert text_formats.man_to_blocks(".so man3/other.3\n") == []
    pod = "=head1 NAME\n\nperlfoo - B<bold> and C<< $a->b >>\n\n    verbatim\n\n=cut\n\nignored\n"
    assert text_formats.pod_to_blocks(pod) == [("h", "NAME", 1), ("p", "perlfoo - bold and $a->b", 0),
                                     ("pre", "verbatim", 0)]


@pytest.mark.slow
def test_rebuild_is_byte_identical(tmp_path):
    """Only meaningful where the exact package versions of PROVENANCE.md are installed."""
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian system")
    prov = PROVENANCE_PATH.read_text(encoding="utf-8")
    for pkg in sources.DEMO_PACKAGES:
        m = re.search(rf"^\| {re.escape(pkg)} \| ([^|]+) \|", prov, flags=re.M)
        try:
            installed = sources.package_version(pkg)
        except sources.MissingPackageError:
            pytest.skip(f"{pkg} not installed")
        if m is None or m.group(1).strip() != installed:
            pytest.skip(f"{pkg} {installed} differs from the recorded version")
    target = float(re.search(r"--target-mb (\S+)`", prov).group(1))
    out = tmp_path / "demo_corpus.jsonl.zst"
    build.build_demo_corpus(out, target, tmp_path / "PROVENANCE.md")
    assert out.read_bytes() == DEMO_CORPUS_PATH.read_bytes()
    assert (tmp_path / "PROVENANCE.md").read_text(encoding="utf-8") == prov
