"""Plain-text source formats to text blocks: the Jargon File, roff man pages (man and mdoc), POD.

Part of the demo corpus builder (tools/demo_corpus/build.py); HTML is in ``blocks``.
"""
from __future__ import annotations

import re

from .blocks import MAX_DOC_BYTES, SPLIT_DOC_BYTES, Block, _chunk, split_blocks

# --------------------------------------------------------------------------------------------
# The Jargon File (plain text)
# --------------------------------------------------------------------------------------------

_JARGON_PART = re.compile(r"^(Chapter\s\d+\.|Appendix\s[A-Z]\.|Glossary$|Bibliography$)")
_JARGON_ENTRY = re.compile(r"^   :[^:].*?:")
_JARGON_LETTER = re.compile(r"^  \S{1,2}$")
_JARGON_SUBHEAD = re.compile(r"^  [A-Za-z][^│┃|]{0,70}$")


def jargon_sections(text: str) -> list[str]:
    """Glossary entries one per document; the prose chapters cut at their sub-headings.

    The per-letter term lists that precede each letter's entries are a table of contents, not
    text, and are dropped (one of them is kept as a planted low-quality fragment).
    """
    lines = text.split("\n")
    parts: list[tuple[str, list[str]]] = []
    for ln in lines:
        if _JARGON_PART.match(ln):
            parts.append((ln, [ln]))
        elif parts:
            parts[-1][1].append(ln)
    out: list[str] = []
    for title, body in parts:
        if title == "Glossary":
            out.extend(_jargon_glossary(body[1:]))
        else:
            out.extend(split_blocks(_drop_toc(_jargon_chapter_blocks(body)), split_level=2))
    return out


def _jargon_chapter_blocks(body: list[str]) -> list[Block]:
    blocks: list[Block] = []
    para: list[str] = []
    for ln in body + [""]:
        if para and (not ln.strip() or _JARGON_PART.match(ln)):
            blocks.append(("pre", _dedent("\n".join(para)), 0))
            para = []
        if _JARGON_PART.match(ln):
            blocks.append(("h", ln.strip(), 1))
        elif _JARGON_SUBHEAD.match(ln) and not para:
            blocks.append(("h", ln.strip(), 2))
        elif ln.strip():
            para.append(ln)
    return blocks


def _drop_toc(blocks: list[Block]) -> list[Block]:
    """Chapter openings repeat their own contents list; drop the one-line entries after it."""
    out: list[Block] = []
    in_toc = False
    for b in blocks:
        if b[0] == "pre" and b[1].strip() == "Table of Contents":
            in_toc = True
            continue
        if in_toc and (b[0] == "h" or (b[0] == "pre" and "\n" not in b[1] and len(b[1]) < 80)):
            if b[0] == "h" and b[2] == 1:
                out.append(b)
            continue
        in_toc = False
        out.append(b)
    return out


def _dedent(s: str) -> str:
    lines = s.split("\n")
    ind = min((len(ln) - len(ln.lstrip(" ")) for ln in lines if ln.strip()), default=0)
    return "\n".join(ln[ind:].rstrip() for ln in lines)


def _jargon_glossary(body: list[str]) -> list[str]:
    entries: list[list[str]] = []
    in_entry = False
    for ln in body:
        if _JARGON_ENTRY.match(ln):
            entries.append([ln])
            in_entry = True
        elif _JARGON_LETTER.match(ln):
            in_entry = False
        elif in_entry:
            entries[-1].append(ln)
    out = []
    for e in entries:
        text = _dedent("\n".join(e)).strip()
        text = re.sub(r"\n{3,}", "\n\n", text)
        if len(text.encode("utf-8")) > MAX_DOC_BYTES:
            out.extend(_chunk([("pre", p, 0) for p in text.split("\n\n")], MAX_DOC_BYTES,
                              SPLIT_DOC_BYTES))
        else:
            out.append(text)
    return out


def jargon_letter_list(text: str, letter: str = "Q") -> str:
    """The glossary's term list for one letter: a real line-list fragment for quality filters."""
    lines = text.split("\n")
    start = next(i for i, ln in enumerate(lines) if ln == "Glossary")
    grab: list[str] = []
    on = False
    for ln in lines[start + 1:]:
        if _JARGON_LETTER.match(ln):
            on = ln.strip() == letter
            continue
        if on:
            if _JARGON_ENTRY.match(ln):
                break
            if ln.strip():
                grab.append(ln.strip())
    return "\n".join(grab)


# --------------------------------------------------------------------------------------------
# man pages (roff) and POD — used by the benchmark corpus
# --------------------------------------------------------------------------------------------

_ROFF_GLYPHS = {
    "em": "—", "en": "–", "aq": "'", "dq": '"', "bu": "•", "lq": "“", "rq": "”", "oq": "‘",
    "cq": "’", "co": "©", "rg": "®", "tm": "™", "mu": "×", ">=": "≥", "<=": "≤", "ha": "^",
    "ti": "~", "rs": "\\", "hy": "-", "mi": "-", "pl": "+", "eq": "=", "!=": "≠", "+-": "±",
    "de": "°", "->": "→", "<-": "←", "ua": "↑", "da": "↓", "Fo": "«", "Fc": "»", "ss": "ß",
    "ga": "`", "aa": "´", "ul": "_", "sl": "/", "ba": "|", "br": "|", "lh": "☜", "rh": "☞",
    "'a": "á", "'e": "é", ":a": "ä", ":o": "ö", ":u": "ü", ":A": "Ä", ":O": "Ö", ":U": "Ü",
    "`a": "à", "`e": "è", "^e": "ê", ",c": "ç", "R": "®", "L\"": "“", "R\"": "”",
}
_ROFF_ESC = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[-+]?(?:\(\d\d|\[\d+\]|\d)|\((..)|\[([^\]]+)\]"
    r"|\*(?:\((..)|\[([^\]]+)\]|(.))|n(?:\(..|\[[^\]]*\]|.)|[kgzwhvlLoxXDSHbN]'[^']*'"
    r"|(.))")


def _roff_escape(m: re.Match) -> str:
    two, named, s2, snamed, s1, single = m.groups()
    if two is not None:
        return _ROFF_GLYPHS.get(two, "")
    if named is not None:
        if named.startswith("u") and len(named) >= 5:
            try:
                return chr(int(named[1:].split("_")[0], 16))
            except ValueError:
                return ""
        return _ROFF_GLYPHS.get(named, "")
    if s2 is not None or snamed is not None or s1 is not None:
        return _ROFF_GLYPHS.get(s2 or snamed or s1 or "", "")
    if single is not None:
        return {"-": "-", "e": "\\", "\\": "\\", "0": " ", " ": " ", "~": " ", "'": "´",
                "`": "`", ".": ".", "t": "\t"}.get(single, "")
    return ""


def roff_text(s: str) -> str:
    return _ROFF_ESC.sub(_roff_escape, s)


def _roff_args(s: str) -> list[str]:
    args, cur, q, i = [], [], False, 0
    while i < len(s):
        c = s[i]
        if c == '"':
            if q and i + 1 < len(s) and s[i + 1] == '"':
                cur.append('"')
                i += 2
                continue
            q = not q
        elif c in " \t" and not q:
            if cur:
                args.append("".join(cur))
                cur = []
        else:
            cur.append(c)
        i += 1
    if cur:
        args.append("".join(cur))
    return args


_MDOC_CALLABLE = frozenset(
    "Ac Ad An Ao Ap Aq Ar At Bc Bo Bq Brc Bro Brq Bsx Bx Cd Cm Dc Do Dq Dv Dx Ec Em Eo Er Ev Fa "
    "Fc Fl Fn Fo Fr Ft Fx Ic Li Lk Ms Mt Nm No Ns Nx Oc Oo Op Ox Pa Pc Pf Po Pq Qc Ql Qo Qq Sc "
    "So Sq Sx Sy Tn Ux Va Vt Xc Xo Xr".split())
_MDOC_WRAP = {"Dq": ("“", "”"), "Sq": ("‘", "’"), "Ql": ("‘", "’"), "Pq": ("(", ")"),
              "Op": ("[", "]"), "Bq": ("[", "]"), "Brq": ("{", "}"), "Aq": ("<", ">"),
              "Qq": ('"', '"')}
_MDOC_OPEN = {"Do": "“", "So": "‘", "Po": "(", "Oo": "[", "Bo": "[", "Bro": "{", "Ao": "<",
              "Qo": '"'}
_MDOC_CLOSE = {"Dc": "”", "Sc": "’", "Pc": ")", "Oc": "]", "Bc": "]", "Brc": "}", "Ac": ">",
               "Qc": '"'}
_CLOSING_PUNCT = frozenset(". , ; : ) ] ? ! ”".split())


def _mdoc_line(tokens: list[str], state: dict) -> str:
    """Render one mdoc macro line: callable macros become their punctuation or vanish, their
    arguments stay (``.Fl o Ar option`` → ``-o option``, ``.Xr ssh 1`` → ``ssh(1)``)."""
    out: list[str] = []
    glue = False
    closers: list[str] = []
    i = 0

    def put(word: str) -> None:
        nonlocal glue
        if out and (glue or word in _CLOSING_PUNCT):
            out[-1] += word
        else:
            out.append(word)
        glue = False

    while i < len(tokens):
        t = tokens[i]
        i += 1
        if t not in _MDOC_CALLABLE:
            put(roff_text(t))
            continue
        if t == "Ns":
            glue = True
        elif t == "Fl":
            nxt = tokens[i] if i < len(tokens) and tokens[i] not in _MDOC_CALLABLE else ""
            i += 1 if nxt else 0
            put("-" + roff_text(nxt))
        elif t == "Xr" and i + 1 < len(tokens) + 1:
            name = tokens[i] if i < len(tokens) else ""
            sec = tokens[i + 1] if i + 1 < len(tokens) else ""
            i += 2
            put(f"{roff_text(name)}({sec})" if sec else roff_text(name))
        elif t == "Nm":
            if i < len(tokens) and tokens[i] not in _MDOC_CALLABLE | _CLOSING_PUNCT:
                state.setdefault("name", roff_text(tokens[i]))
                put(roff_text(tokens[i]))
                i += 1
            elif state.get("name"):
                put(state["name"])
        elif t in _MDOC_WRAP:
            o, c = _MDOC_WRAP[t]
            put(o)
            glue = True
            closers.append(c)
        elif t in _MDOC_OPEN:
            put(_MDOC_OPEN[t])
            glue = True
        elif t in _MDOC_CLOSE:
            put(_MDOC_CLOSE[t])
        # any other callable macro only sets a font: drop it, keep its arguments
    for c in reversed(closers):
        if out:
            out[-1] += c
    return " ".join(out)


def man_to_blocks(src: str) -> list[Block]:
    """A deliberately small roff reader for man(7) and mdoc(7) pages.

    It is not groff: requests it does not know are dropped, which loses little prose and is fast
    and deterministic. A page that is only a ``.so`` link yields nothing.
    """
    blocks: list[Block] = []
    buf: list[str] = []
    nofill = False
    in_table = False
    table_fmt = False
    tag_next = False  # the line after .TP is the tag of a list item: a block of its own
    state: dict = {}

    def flush(kind="p", level=0):
        if not buf:
            return
        if kind == "pre" or nofill:
            text = "\n".join(x.rstrip() for x in buf).strip("\n")
            kind = "pre" if kind == "p" else kind
        else:
            text = " ".join(" ".join(buf).split())
        buf.clear()
        if text.strip():
            blocks.append((kind, text, level))

    def emit(text: str) -> None:
        nonlocal tag_next
        if nofill:
            buf.append(text)
            return
        if text.strip():
            buf.append(text.strip())
            if tag_next:
                flush()
                tag_next = False

    for raw in src.split("\n"):
        if raw.startswith(('.\\"', "'\\\"", '\\"', '.\\#')) or raw in (".", "'"):
            continue
        if in_table:
            if raw.startswith(".TE"):
                in_table = False
                flush("pre")
            elif table_fmt:
                if raw.rstrip().endswith("."):
                    table_fmt = False
            elif not raw.startswith("."):
                buf.append(roff_text(raw.replace("T{", "").replace("T}", "")).replace("\t", " | "))
            continue
        if raw.startswith((".", "'")):
            parts = raw[1:].strip().split(None, 1)
            if not parts:
                continue
            req = parts[0]
            args = _roff_args(parts[1]) if len(parts) > 1 else []
            if req == "so":
                return []
            if req in ("SH", "SS", "Sh", "Ss"):
                flush()
                title = roff_text(" ".join(args)).strip()
                if title:
                    blocks.append(("h", title, 2 if req in ("SH", "Sh") else 3))
            elif req in ("TH", "Dt"):
                flush()
                if args:
                    name = roff_text(args[0])
                    sec = roff_text(args[1]) if len(args) > 1 else ""
                    blocks.append(("h", f"{name}({sec})" if sec else name, 1))
            elif req in ("PP", "LP", "P", "HP", "sp", "br", "RS", "RE", "in", "ti", "ne", "Pp",
                         "Lp", "Bl", "El"):
                flush()
            elif req in ("TP", "TQ"):
                flush()
                tag_next = True
            elif req == "IP":
                flush()
                if args and args[0] not in ("", "\\(bu", "\\[bu]", "*", "-"):
                    buf.append(roff_text(args[0]))
            elif req == "It":
                flush()
                if args:
                    buf.append(_mdoc_line(args, state))
                    flush()
            elif req in ("nf", "EX") or (req == "Bd" and "-literal" in args):
                flush()
                nofill = True
            elif req in ("fi", "EE", "Ed"):
                if nofill:
                    flush("pre")
                nofill = False
            elif req == "Dl":
                flush()
                buf.append(_mdoc_line(args, state))
                flush("pre")
            elif req == "Nd":
                emit("- " + _mdoc_line(args, state))
            elif req == "TS":
                flush()
                in_table, table_fmt = True, True
            elif req in ("B", "I", "SM", "SB", "UR", "MT"):
                if args:
                    emit(roff_text(" ".join(args)))
            elif req in ("BR", "BI", "IB", "IR", "RB", "RI"):
                emit(roff_text("".join(args)))
            elif req in ("UE", "ME"):
                if args and buf:
                    buf[-1] += roff_text("".join(args))
            elif req in _MDOC_CALLABLE:
                emit(_mdoc_line([req] + args, state))
            # anything else (string/macro definitions, conditionals, …) carries no prose
            continue
        line = roff_text(raw)
        if nofill:
            buf.append(line)
        elif line.strip():
            emit(line)
        else:
            flush()
    flush()
    return blocks


_POD_CODE = re.compile(r"([A-Z])<([^<>]*)>")
_POD_CODE_N = tuple(re.compile(rf"([A-Z]){'<' * n}\s+(.*?)\s+{'>' * n}", re.S) for n in (4, 3, 2))


def _pod_inline(s: str) -> str:
    def code(letter: str, body: str) -> str:
        if letter in "XZ":
            return ""
        if letter == "E":
            return {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"'}.get(
                body, chr(int(body[2:], 16)) if body.startswith("0x") else
                chr(int(body)) if body.isdigit() else "")
        if letter == "L":
            text = body.split("|", 1)[0] if "|" in body else body
            return text.replace('"', "")
        return body

    for pat in _POD_CODE_N:
        s = pat.sub(lambda m: code(m.group(1), m.group(2)), s)
    for _ in range(8):
        new = _POD_CODE.sub(lambda m: code(m.group(1), m.group(2)), s)
        if new == s:
            break
        s = new
    return s


def pod_to_blocks(src: str) -> list[Block]:
    """Perl's POD: ``=head`` headings, ``=item`` lists, indented verbatim paragraphs."""
    blocks: list[Block] = []
    in_pod = False
    skip_until: str | None = None
    for para in re.split(r"\n[ \t]*\n", src):
        if not para.strip():
            continue
        first = para.lstrip("\n")
        if skip_until is not None:
            if first.startswith(skip_until):
                skip_until = None
            continue
        if first.startswith("="):
            cmd, _, rest = first[1:].partition(" ")
            cmd = cmd.split("\n")[0]
            rest = " ".join(rest.split())
            in_pod = cmd != "cut"
            if cmd.startswith("head") and cmd[4:].isdigit():
                blocks.append(("h", _pod_inline(rest), int(cmd[4:])))
            elif cmd == "item":
                if rest and rest not in ("*", "-"):
                    blocks.append(("li", "- " + _pod_inline(rest), 0))
            elif cmd == "begin":
                skip_until = "=end"
            continue
        if not in_pod:
            continue
        if first[:1] in (" ", "\t"):
            blocks.append(("pre", _dedent(first.rstrip()), 0))
        else:
            blocks.append(("p", " ".join(_pod_inline(first).split()), 0))
    return blocks
