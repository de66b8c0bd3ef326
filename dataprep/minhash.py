"""Text normalization, word-shingle hashing and MinHash signatures for deduplication, in numpy.

Why batch-vectorized: a signature costs (shingles × permutations) arithmetic, which numpy does at
memory speed, but the usual per-document Python around it — splitting into word objects, joining
shingle strings, one hash call per shingle — costs more than the arithmetic. Here the only Python
work per document is ``lower()``/``encode()`` (and NFKC for non-ASCII text); everything else runs
over the UTF-8 bytes of a whole batch of documents at once:

1. *Normalization* (lowercase, NFKC, punctuation/symbols/whitespace become word separators):
   ASCII bytes by vectorized comparisons, non-ASCII characters by decoding their code points in
   numpy and looking them up in a table of Unicode categories P*, S*, Z* (built once per process).
2. *Word hashes*: a polynomial hash of each word's bytes (mod 2^64, from prefix sums over the
   whole batch), finished with the splitmix64 mixer and the word length; no word objects exist.
   Words of :data:`LONG_WORD` bytes or more (rare) are hashed with xxh3 instead.
3. *Exact key*: a sum of the document's (word hash, position) pairs, each mixed: equal iff the
   normalized word sequences are equal (up to 64-bit collisions). It depends on no MinHash
   parameter, so exact-duplicate decisions and survivor order stay put when LSH settings change.
4. *Shingles*: every run of ``ngram`` consecutive words of a document, folded and mixed to 64 bits
   (shingles never span two documents). A document with fewer words than ``ngram`` has one shingle,
   its whole normalized text (its exact key). A document with no word at all after normalization
   (only punctuation, say) is keyed by its raw text, so "!!!" and "???" stay distinct.
5. *MinHash*: Dietzfelbinger's multiply-add-shift family ``h(x) = ((a·x + b) mod 2^64) >> 32`` on
   the shingle hash's top 32 bits, which is 2-independent for 32-bit keys (the same guarantee as the
   textbook ``(a·x + b) mod (2^61 − 1)``) yet needs one wrapping uint64 multiply and add per
   (shingle, permutation) — no 128-bit products, no modulo. Minima per document come from
   ``np.minimum.reduceat`` over row chunks, so memory is bounded by the chunk, not the document.
6. *Bands*: the signature's ``num_bands × rows_per_band`` values, each band folded to one 64-bit
   hash: two documents are LSH candidates when any band hash is equal. The probability is
   ``1 − (1 − J^r)^b`` for Jaccard similarity J (:func:`candidate_probability`).

Permutation constants come from a splitmix64 stream of the seed computed in Python, not from
numpy's generators (whose streams may change between numpy versions): signatures must stay
byte-identical across machines and versions.

:func:`normalize_words`, :func:`reference_exact_key` and :func:`reference_shingles` are slow,
obviously-correct pure-Python versions of steps 1–4; the tests hold the vectorized path to them.
"""
from __future__ import annotations

import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_BYTE_BASE = 0x9E3700010CD775           # odd multiplier of the per-word byte polynomial
_WORD_BASE = 0xD6E8FEB86659FD93          # odd multiplier folding word hashes (exact key, shingles)
_SHORT_TAG = 0x5851F42D4C957F2D          # keeps a whole-text key apart from an n-gram fold
_EMPTY_SEED = 0x27D4EB2F165667C5         # seed of the raw-text key of a wordless document
_LONG_SEED = 0x165667B19E3779F9
LONG_WORD = 1024
"""Words of this many bytes or more are hashed with xxh3 instead of the byte polynomial: polynomial
hashes mod 2^64 collide for Thue-Morse strings of 2^11 bytes, whatever the base."""

_U64 = np.uint64
_S30, _S27, _S31, _S32 = _U64(30), _U64(27), _U64(31), _U64(32)
_M1, _M2 = _U64(_MIX1), _U64(_MIX2)

_ASCII_SEPARATORS = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def _is_separator(ch: str) -> bool:
    """Characters that separate words after normalization: whitespace, punctuation, symbols."""
    return ch in _ASCII_SEPARATORS or ch == "\x85" or unicodedata.category(ch)[0] in "PSZ"


# -- the reference (pure Python) definition ----------------------------------------------------------

def _fold_case(text: str) -> str:
    if text.isascii():
        return text.lower()
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    return text.lower()


def normalize_words(text: str) -> list[str]:
    """The words of ``text`` after normalization (reference implementation, slow)."""
    folded = _fold_case(text)
    return "".join(" " if _is_separator(c) else c for c in folded).split()


def normalize_text(text: str) -> str:
    """Normalized text: lowercase, NFKC, punctuation and symbols stripped, whitespace collapsed."""
    return " ".join(normalize_words(text))


def _mix_int(x: int) -> int:
    x &= M64
    x = ((x ^ (x >> 30)) * _MIX1) & M64
    x = ((x ^ (x >> 27)) * _MIX2) & M64
    return x ^ (x >> 31)


def _word_hash_int(word: bytes) -> int:
    if len(word) >= LONG_WORD:
        return xxhash.xxh3_64_intdigest(word, seed=_LONG_SEED)
    acc, p = 0, 1
    for byte in word:
        acc = (acc + (byte + 1) * p) & M64
        p = (p * _BYTE_BASE) & M64
    return _mix_int(acc ^ ((len(word) * _GOLDEN) & M64))


def _fold_int(hashes: Sequence[int]) -> int:
    acc = 0
    for h in hashes:
        acc = (acc * _WORD_BASE + h) & M64
    return acc


def _raw_key(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"), seed=_EMPTY_SEED)


def reference_exact_key(text: str) -> int:
    """The exact-duplicate key of ``text`` (reference implementation of :attr:`Sketch.exact`)."""
    words = [w.encode("utf-8", "surrogatepass") for w in normalize_words(text)]
    if not words:
        return _raw_key(text)
    acc = sum(_mix_int(_word_hash_int(w) + (k + 1) * _WORD_BASE) for k, w in enumerate(words))
    return _mix_int(acc + len(words) * _GOLDEN)


def reference_shingles(text: str, ngram: int) -> list[int]:
    """The 64-bit shingle hashes of ``text`` in order (reference implementation)."""
    hashes = [_word_hash_int(w.encode("utf-8", "surrogatepass")) for w in normalize_words(text)]
    if len(hashes) < ngram:
        return [reference_exact_key(text) ^ _SHORT_TAG]
    return [_mix_int(_fold_int(hashes[j:j + ngram])) for j in range(len(hashes) - ngram + 1)]


# -- vectorized building blocks ----------------------------------------------------------------------

def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (a new array)."""
    x = x ^ (x >> _S30)
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


def splitmix64_stream(seed: int, n: int) -> list[int]:
    """``n`` pseudo-random 64-bit integers from ``seed``, identical on every platform and version."""
    state, out = seed & M64, []
    for _ in range(n):
        state = (state + _GOLDEN) & M64
        out.append(_mix_int(state))
    return out


class _Powers:
    """``base**k`` and ``base**-k`` (mod 2^64, base odd) for k < n, cached and grown on demand.

    Tables up to ``cache_limit`` entries stay cached (a batch's worth); a longer request (one huge
    document) gets tables of its own that are dropped after use.
    """

    def __init__(self, base: int, cache_limit: int = 1 << 22):
        self.base, self.inverse = base, pow(base, -1, 1 << 64)
        self.cache_limit = cache_limit
        self._pow = self._inv = np.ones(1, dtype=np.uint64)

    @staticmethod
    def _table(base: int, size: int) -> np.ndarray:
        t = np.empty(size, dtype=np.uint64)
        t[0] = 1
        t[1:] = _U64(base)
        return np.cumprod(t, out=t)

    def both(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(powers, inverse powers), each at least ``n`` long."""
        if n <= len(self._pow) and n <= len(self._inv):
            return self._pow, self._inv
        size = max(n, min(2 * len(self._pow), self.cache_limit), 1024)
        pw = self._table(self.base, size) if n > len(self._pow) else self._pow
        inv = self._table(self.inverse, size) if n > len(self._inv) else self._inv
        if size <= self.cache_limit:
            self._pow, self._inv = pw, inv
        return pw, inv


_BYTE_POW = _Powers(_BYTE_BASE)


def ascii_separator_mask(b: np.ndarray) -> np.ndarray:
    """Separator bytes among ASCII (whitespace, punctuation, symbols); comparisons, not a table
    gather, because they vectorize (a 256-entry lookup costs ~30x more per byte)."""
    m = (b >= 28) & (b <= 47)      # \x1c-\x1f, space and !"#$%&'()*+,-./
    m |= (b >= 9) & (b <= 13)      # \t \n \v \f \r
    m |= (b >= 58) & (b <= 64)     # :;<=>?@
    m |= (b >= 91) & (b <= 96)     # [\]^_`
    m |= (b >= 123) & (b <= 126)   # {|}~
    return m


_BMP_SEP: np.ndarray | None = None


def _bmp_separator_table() -> np.ndarray:
    global _BMP_SEP
    if _BMP_SEP is None:
        table = np.zeros(0x10000, dtype=bool)
        for cp in range(0x80, 0x10000):
            if not 0xD800 <= cp < 0xE000:
                table[cp] = _is_separator(chr(cp))
        _BMP_SEP = table
    return _BMP_SEP


def _mark_unicode_separators(b: np.ndarray, sep: np.ndarray) -> None:
    """Set ``sep`` on every byte of a non-ASCII separator character (the buffer is valid UTF-8)."""
    lead = np.flatnonzero(b >= 0xC0)
    if not len(lead):
        return
    n = len(b)
    b0 = b[lead].astype(np.uint32)
    b1 = (b[np.minimum(lead + 1, n - 1)] & 0x3F).astype(np.uint32)
    b2 = (b[np.minimum(lead + 2, n - 1)] & 0x3F).astype(np.uint32)
    b3 = (b[np.minimum(lead + 3, n - 1)] & 0x3F).astype(np.uint32)
    two, three = b0 < 0xE0, (b0 >= 0xE0) & (b0 < 0xF0)
    cp = np.where(two, ((b0 & 0x1F) << 6) | b1,
                  np.where(three, ((b0 & 0x0F) << 12) | (b1 << 6) | b2,
                           ((b0 & 0x07) << 18) | (b1 << 12) | (b2 << 6) | b3))
    length = np.where(two, 2, np.where(three, 3, 4))
    bmp = cp < 0x10000
    is_sep = np.zeros(len(cp), dtype=bool)
    is_sep[bmp] = _bmp_separator_table()[cp[bmp]]
    if not bmp.all():
        astral = np.unique(cp[~bmp])
        seps = [c for c in astral.tolist() if c <= sys.maxunicode and _is_separator(chr(c))]
        if seps:
            is_sep[~bmp] = np.isin(cp[~bmp], np.asarray(seps, dtype=np.uint32))
    starts, lengths = lead[is_sep], length[is_sep]
    for k in range(4):
        sep[starts[lengths > k] + k] = True


@dataclass
class _Words:
    hashes: np.ndarray      # uint64 per word, all documents of the batch in order
    first: np.ndarray       # int64 index of each document's first word
    counts: np.ndarray      # int64 words per document


def _batch_words(encoded: list[bytes]) -> _Words:
    """Split a batch of case-folded UTF-8 documents into words and hash each word.

    The word hash is ``sum((byte_i + 1) * P^i)`` over the word's bytes: computed for all words at
    once as a difference of prefix sums over the whole buffer, shifted back by ``P^-start``.
    """
    buf = b"\n".join(encoded)
    b = np.frombuffer(buf, dtype=np.uint8)
    n = len(b)
    sep = ascii_separator_mask(b)
    if not buf.isascii():
        _mark_unicode_separators(b, sep)
    padded = np.ones(n + 2, dtype=np.int8)
    padded[1:-1] = sep
    edges = np.diff(padded)
    starts = np.flatnonzero(edges == -1)
    ends = np.flatnonzero(edges == 1)
    n_words = len(starts)
    doc_starts = np.zeros(len(encoded), dtype=np.int64)
    if len(encoded) > 1:
        np.cumsum([len(e) + 1 for e in encoded[:-1]], out=doc_starts[1:])
    first = np.searchsorted(starts, doc_starts)
    counts = np.diff(np.append(first, n_words))
    if not n_words:
        return _Words(np.zeros(0, dtype=np.uint64), first, counts)
    pw, inv = _BYTE_POW.both(n)
    vals = b.astype(np.uint64)
    vals += np.left_shift(((b >= 65) & (b <= 90)).view(np.uint8), 5)  # ASCII lowercase
    vals += _U64(1)
    vals *= pw[:n]
    prefix = np.empty(n + 1, dtype=np.uint64)
    prefix[0] = 0
    np.cumsum(vals, out=prefix[1:])
    acc = prefix[ends] - prefix[starts]
    acc *= inv[starts]
    lengths = ends - starts
    acc ^= lengths.astype(np.uint64) * _U64(_GOLDEN)
    hashes = mix64(acc)
    for i in np.flatnonzero(lengths >= LONG_WORD).tolist():   # rare: base64 blobs, long URLs
        hashes[i] = xxhash.xxh3_64_intdigest(buf[starts[i]:ends[i]].lower(), seed=_LONG_SEED)
    return _Words(hashes, first, counts)


def _exact_keys(words: _Words, texts: Sequence[str]) -> np.ndarray:
    """Per document: ``mix(sum_k mix(word_k + (k + 1) * B) + words * G)``. A sum of nonlinearly
    mixed (word, position) terms rather than a polynomial, because polynomial hashes mod 2^64
    collide for structured sequences (Thue-Morse patterns of two words) whatever the base."""
    keys = np.zeros(len(words.counts), dtype=np.uint64)
    has = words.counts > 0
    if has.any():
        counts = words.counts[has]
        offs = np.cumsum(counts) - counts          # documents' words are contiguous and in order
        pos = np.arange(len(words.hashes), dtype=np.int64) - np.repeat(offs, counts) + 1
        terms = mix64(words.hashes + pos.astype(np.uint64) * _U64(_WORD_BASE))
        acc = np.add.reduceat(terms, offs)
        acc += counts.astype(np.uint64) * _U64(_GOLDEN)
        keys[has] = mix64(acc)
    for i in np.flatnonzero(~has).tolist():
        keys[i] = _raw_key(texts[i])
    return keys


def _shingles(words: _Words, exact: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """(shingle hashes of all documents in order, per-document offsets of length D + 1)."""
    counts = words.counts
    long_doc = counts >= ngram
    per_doc = np.where(long_doc, counts - ngram + 1, 1)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(per_doc, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.uint64)
    is_long_slot = np.repeat(long_doc, per_doc)
    if long_doc.any():
        h = words.hashes
        n_pos = len(h) - ngram + 1
        acc = h[:n_pos].copy()
        base = _U64(_WORD_BASE)
        for k in range(1, ngram):
            acc *= base
            acc += h[k:k + n_pos]
        # a window is valid when it starts at least ngram-1 words before its document's end
        doc_end = np.repeat(words.first + counts, counts)[:n_pos]
        valid = np.arange(n_pos) + ngram <= doc_end
        out[is_long_slot] = mix64(acc[valid])
    out[~is_long_slot] = exact[~long_doc] ^ _U64(_SHORT_TAG)
    return out, offsets


# -- the public API ------------------------------------------------------------------------------------

def candidate_probability(jaccard: float, num_bands: int, rows_per_band: int) -> float:
    """Probability that two documents of Jaccard similarity ``jaccard`` share at least one band."""
    return 1.0 - (1.0 - jaccard ** rows_per_band) ** num_bands


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sets given as sorted unique arrays."""
    if not len(a) and not len(b):
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """MinHash estimate of the Jaccard similarity: the fraction of equal signature values."""
    return float(np.mean(sig_a == sig_b))


@dataclass
class Sketch:
    """What deduplication keeps of a batch of documents (D documents)."""

    exact: np.ndarray       # (D,) uint64 exact-duplicate key of the normalized text
    text_hash: np.ndarray   # (D,) uint64 hash of the raw text (survivor tie-break)
    words: np.ndarray       # (D,) int64 words after normalization
    bands: np.ndarray       # (D, num_bands) uint64 band hashes (num_bands = 0 without MinHash)
    signature: np.ndarray | None  # (D, num_perm) uint32, when asked for


class MinHasher:
    """MinHash LSH over word n-gram shingles; see the module docstring for the scheme.

    ``batch_bytes`` bounds the text normalized at once, ``chunk_rows`` the shingles per
    (shingles × permutations) matrix; neither changes any result.
    """

    def __init__(self, ngram: int = 5, num_bands: int = 14, rows_per_band: int = 8, seed: int = 1,
                 batch_bytes: int = 1 << 20, chunk_rows: int = 2048):
        if ngram < 1 or num_bands < 0 or rows_per_band < 1:
            raise ValueError(f"need ngram >= 1, num_bands >= 0, rows_per_band >= 1; "
                             f"got {ngram}, {num_bands}, {rows_per_band}")
        self.ngram, self.num_bands, self.rows_per_band, self.seed = ngram, num_bands, rows_per_band, seed
        self.num_perm = num_bands * rows_per_band
        self.batch_bytes, self.chunk_rows = batch_bytes, chunk_rows
        stream = splitmix64_stream(seed, 2 * self.num_perm + num_bands)
        self._a = np.asarray(stream[:self.num_perm], dtype=np.uint64)
        self._b = np.asarray(stream[self.num_perm:2 * self.num_perm], dtype=np.uint64)
        self._band_seed = np.asarray(stream[2 * self.num_perm:], dtype=np.uint64)

    @property
    def permutations(self) -> tuple[np.ndarray, np.ndarray]:
        """The (a, b) constants of the ``num_perm`` hash functions (copies)."""
        return self._a.copy(), self._b.copy()

    # -- batches ---------------------------------------------------------------------------------
    def _batches(self, texts: Sequence[str]):
        """Yield (start, encoded case-folded texts) in groups of about ``batch_bytes``."""
        batch, size, start = [], 0, 0
        for i, t in enumerate(texts):
            e = (t if t.isascii() else _fold_case(t)).encode("utf-8", "surrogatepass")
            batch.append(e)
            size += len(e)
            if size >= self.batch_bytes:
                yield start, batch
                batch, size, start = [], 0, i + 1
        if batch:
            yield start, batch

    def sketch(self, texts: Sequence[str], signature: bool = False) -> Sketch:
        """Exact keys, raw-text hashes and band hashes (and full signatures if asked) of ``texts``."""
        d = len(texts)
        exact = np.zeros(d, dtype=np.uint64)
        words = np.zeros(d, dtype=np.int64)
        bands = np.zeros((d, self.num_bands), dtype=np.uint64)
        sig = np.zeros((d, self.num_perm), dtype=np.uint32) if signature else None
        text_hash = np.fromiter((xxhash.xxh3_64_intdigest(t.encode("utf-8", "surrogatepass")) for t in texts),
                                dtype=np.uint64, count=d)
        for start, encoded in self._batches(texts):
            stop = start + len(encoded)
            w = _batch_words(encoded)
            e = _exact_keys(w, texts[start:stop])
            exact[start:stop] = e
            words[start:stop] = w.counts
            if self.num_perm:
                shingles, offsets = _shingles(w, e, self.ngram)
                s = self._minhash(shingles, offsets)
                bands[start:stop] = self._bands(s)
                if sig is not None:
                    sig[start:stop] = s
        return Sketch(exact=exact, text_hash=text_hash, words=words, bands=bands, signature=sig)

    def shingle_sets(self, texts: Sequence[str], top32: bool = False) -> list[np.ndarray]:
        """Each document's shingle hashes as a sorted unique array (for exact Jaccard): uint64, or
        with ``top32`` their top 32 bits as uint32 — the values the MinHash permutations see, so
        their Jaccard is exactly the one the signatures estimate."""
        out: list[np.ndarray] = []
        for start, encoded in self._batches(texts):
            w = _batch_words(encoded)
            e = _exact_keys(w, texts[start:start + len(encoded)])
            shingles, offsets = _shingles(w, e, self.ngram)
            if top32:
                shingles = (shingles >> _S32).astype(np.uint32)
            out.extend(np.unique(shingles[offsets[i]:offsets[i + 1]]) for i in range(len(encoded)))
        return out

    # -- MinHash and banding ----------------------------------------------------------------------
    def _minhash(self, shingles: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """(D, num_perm) uint32 minima of the permuted shingle hashes; every document has >= 1."""
        d = len(offsets) - 1
        x = shingles >> _S32
        lows = np.full((d, self.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
        starts = offsets[:-1]
        total = len(x)
        buf = np.empty((min(self.chunk_rows, total), self.num_perm), dtype=np.uint64)
        for r0 in range(0, total, self.chunk_rows):
            r1 = min(total, r0 + self.chunk_rows)
            d0 = int(np.searchsorted(offsets, r0, side="right")) - 1
            d1 = int(np.searchsorted(starts, r1, side="left"))
            m = buf[: r1 - r0]
            np.multiply(x[r0:r1, None], self._a[None, :], out=m)
            m += self._b
            seg = np.maximum(starts[d0:d1], r0) - r0
            part = np.minimum.reduceat(m, seg, axis=0)
            np.minimum(lows[d0:d1], part, out=lows[d0:d1])
        return (lows >> _S32).astype(np.uint32)

    def _bands(self, sig: np.ndarray) -> np.ndarray:
        rows = sig.reshape(len(sig), self.num_bands, self.rows_per_band).astype(np.uint64)
        h = np.broadcast_to(self._band_seed, rows.shape[:2]).copy()
        for r in range(self.rows_per_band):
            h = mix64(h ^ rows[:, :, r])
        return h
