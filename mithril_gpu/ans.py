"""The ``ans`` chunk codec (id 2, feature ``"ans"``): the numpy reference of FORMAT.md "The ans codec".

A static order-0 rANS coder with interleaved lanes. Huffman coding (zstd's literals) spends at
least one bit on every byte, so it wastes most where deltas are sparse or tiny: a masked delta's
value plane in which +1 and -1 ulp make up nearly everything costs 1.5 bits per byte in Huffman
against about 1.05 bits of entropy. rANS codes each symbol in ``L - log2(freq)`` bits.

Payload, all integers little-endian:

====================  =============================================================
``L + 16 * mode``     u8: ``L``, the table log, 1..15: frequencies sum to ``M = 2^L``;
                      ``mode`` 0: a symbol is a byte of the plane (``n`` symbols); 1: a
                      symbol is a nibble (``2n`` symbols: symbol ``2i`` is the low nibble of
                      byte ``i``, symbol ``2i + 1`` its high nibble; every symbol below 16)
                      (any other mode is refused)
``lanes``             u8, 1..32: symbol ``i`` belongs to lane ``i % lanes``
``nsym - 1``          u8: the number of distinct symbols, 1..256 (and at most ``M``; at most 16
                      in mode 1, whose symbols are therefore always a list, each below 16)
symbols               ``nsym < 32``: ``nsym`` bytes, strictly increasing; otherwise a 32-byte
                      bitmap (symbol ``s`` is present when bit ``s & 7``, counted from the least
                      significant, of byte ``s >> 3`` is set) with exactly ``nsym`` bits set
frequencies           ``nsym`` unsigned LEB128 numbers in minimal form (7 bits per byte, least
                      significant group first, the high bit set on all bytes but the last,
                      which is not 0 unless it is the only byte; at most 3 bytes), in symbol
                      order, each 1..M, summing to exactly ``M``
states                ``lanes`` u32, the lanes' initial states, each at least ``2^16``
words                 the rest of the payload: u16 words (an even number of bytes)
====================  =============================================================

Decoding symbol ``i = 0, 1, ..., N - 1`` (``N`` is ``n``, the chunk's uncompressed size, known from
the index, or ``2n`` in nibble mode) with lane ``j = i % lanes`` and state ``x = x_j``: ``slot = x mod M``; the symbol ``s`` is
the one with ``cum[s] <= slot < cum[s] + freq[s]`` (``cum``: running sums of the frequencies in
symbol order); ``x = freq[s] * (x >> L) + slot - cum[s]``; if ``x < 2^16``, then
``x = (x << 16) | w`` with ``w`` the next unread word. The payload is valid only when no read
runs past its end, every word has been read at the end, and every lane's state is back at
``2^16``. A decoder refuses anything else (a damaged chunk never decodes silently).

The encoder runs backwards: every state starts at ``2^16``; for ``i = N - 1`` down to ``0``, with
``f = freq[s]``, if ``x >= f * 2^(32 - L)`` (in 64 bits, or as ``x >> (32 - L) >= f``: with one
symbol ``f * 2^(32 - L)`` is ``2^32``) it emits ``x & 0xffff`` and sets ``x >>= 16``; then
``x = ((x // f) << L) + x % f + cum[s]``. The words are stored in the reverse of the order they
were emitted; the final states are the initial states of the payload.

With states in ``[2^16, 2^32)`` and ``L <= 15`` a lane reads at most one word per symbol, so a
GPU warp decodes a chunk of 32 lanes in lockstep: each step every lane decodes its symbol, and
the lanes that need a word take them in lane order from a ballot's prefix count.

The index adds its own rules for a chunk of this codec (FORMAT.md "Chunks and codecs"): the file
lists the feature ``"ans"``, ``n >= 1``, ``csize >= 9`` and ``csize * 32768 >= n``.

What a writer chooses (not part of the format): the frequencies (:func:`normalize`), ``L``
(mithril uses 12), the lanes (:func:`lanes_for`), the mode (nibbles where their 16-entry table
makes the payload smaller: sparse bitmaps of small segments, whose bytes take 100 and more values),
and whether to use the codec at all (the C helper's estimate against Huffman coding, then the
smaller of this and zstd's actual frame).
"""
from __future__ import annotations

import numpy as np

from .errors import CorruptFileError

LOW = 1 << 16
MAX_LOG = 15
MAX_LANES = 32
LOG = 12                      # the table log mithril writes


def normalize(counts, L: int = LOG) -> list[int]:
    """Frequencies (256 ints) summing to ``2^L`` from symbol counts, each present symbol at
    least 1: counts scaled and rounded half up, the rounding's remainder added to the most
    frequent symbol (the lowest on ties), or taken from the largest frequencies (lowest symbol
    first on ties) down to 1. Integer arithmetic only; the C helper computes the same."""
    counts = [int(c) for c in counts]
    n, M = sum(counts), 1 << L
    f = [0] * 256
    big = -1
    for s, c in enumerate(counts):
        if c:
            f[s] = max(1, (2 * c * M + n) // (2 * n))
            if big < 0 or c > counts[big]:
                big = s
    diff = M - sum(f)
    if diff > 0:
        f[big] += diff
    while diff < 0:
        b = -1
        for s in range(256):
            if f[s] > 1 and (b < 0 or f[s] > f[b]):
                b = s
        if b < 0:
            raise ValueError(f"more symbols than 2^{L} slots")
        take = min(f[b] - 1, -diff)
        f[b] -= take
        diff += take
    return f


def lanes_for(n: int) -> int:
    """Lanes mithril writes for ``n`` symbols: one per 8 Ki symbols, a power of two, at most 32."""
    lanes = 1
    while lanes < MAX_LANES and lanes * 2 * 8192 <= n:
        lanes *= 2
    return lanes


def nibbles(src: np.ndarray) -> np.ndarray:
    """The nibble-mode symbols of bytes ``src``: low nibble, then high nibble, of each."""
    return np.stack([src & 15, src >> 4], axis=1).reshape(-1)


def header(L: int, lanes: int, freq: list[int], mode: int = 0) -> bytes:
    syms = [s for s in range(256) if freq[s]]
    out = bytearray([L + 16 * mode, lanes, len(syms) - 1])
    if len(syms) < 32:
        out += bytes(syms)
    else:
        bm = bytearray(32)
        for s in syms:
            bm[s >> 3] |= 1 << (s & 7)
        out += bm
    for s in syms:
        v = freq[s]
        while v >= 128:
            out.append((v & 127) | 128)
            v >>= 7
        out.append(v)
    return bytes(out)


def encode(src: np.ndarray, L: int = LOG, lanes: int | None = None, freq: list[int] | None = None,
           nibble_mode: bool = False) -> bytes:
    """The payload of ``src`` (uint8), with frequencies ``normalize(counts, L)`` of its symbols
    (bytes, or nibbles with ``nibble_mode``) unless given."""
    src = np.ascontiguousarray(src, np.uint8).reshape(-1)
    if nibble_mode:
        src = nibbles(src)
    n = src.size
    lanes = lanes_for(n) if lanes is None else lanes
    if not (1 <= L <= MAX_LOG and 1 <= lanes <= MAX_LANES):
        raise ValueError("table log 1..15 and lanes 1..32")
    if freq is None:
        freq = normalize(np.bincount(src, minlength=256), L)
    f = np.array(freq, np.uint64)
    cum = np.concatenate([[0], np.cumsum(f)[:-1]]).astype(np.uint64)
    xmax = f << np.uint64(32 - L)
    x = np.full(lanes, LOW, np.uint64)
    emitted = []                                   # words in the order they are emitted
    full = n - n % lanes
    for start, cnt in [(full, n - full)] + [(r, lanes) for r in range(full - lanes, -1, -lanes)]:
        if cnt == 0:
            continue
        s = src[start:start + cnt].astype(np.int64)
        xs = x[:cnt]
        fs = f[s]
        out = xs >= xmax[s]
        # lanes emit from the highest to the lowest (the encoder walks symbols backwards)
        emitted.extend(int(w) for w in (xs[out] & np.uint64(0xFFFF))[::-1])
        xs = np.where(out, xs >> np.uint64(16), xs)
        x[:cnt] = ((xs // fs) << np.uint64(L)) + xs % fs + cum[s]
    words = np.array(emitted[::-1], np.uint16)
    return header(L, lanes, freq, int(nibble_mode)) + x.astype("<u4").tobytes() + words.astype("<u2").tobytes()


def parse(payload) -> tuple[int, int, list[int], list[int], np.ndarray, np.ndarray, int]:
    """(L, lanes, symbols, frequencies, initial states, words, mode) of a payload;
    CorruptFileError when its header is not valid."""
    b = bytes(payload)

    def bad(why):
        return CorruptFileError(f"an ans chunk is damaged ({why})")
    if len(b) < 3:
        raise bad("too short")
    L, mode, lanes, nsym = b[0] & 15, b[0] >> 4, b[1], b[2] + 1
    alpha = 16 if mode == 1 else 256
    if not (mode <= 1 and 1 <= L <= MAX_LOG and 1 <= lanes <= MAX_LANES and nsym <= 1 << L and nsym <= alpha):
        raise bad("bad mode, table log, lanes or symbol count")
    h = 3
    if nsym < 32:
        syms = list(b[h:h + nsym])
        if len(syms) != nsym or any(a >= c for a, c in zip(syms, syms[1:])) or max(syms) >= alpha:
            raise bad("bad symbol list")
        h += nsym
    else:
        bm = b[h:h + 32]
        if len(bm) != 32:
            raise bad("too short")
        syms = [s for s in range(256) if bm[s >> 3] >> (s & 7) & 1]
        if len(syms) != nsym:
            raise bad("bad symbol bitmap")
        h += 32
    freq = []
    for _ in range(nsym):
        v = sh = 0
        while True:
            if h >= len(b) or sh > 14:
                raise bad("bad frequencies")
            c = b[h]
            h += 1
            v |= (c & 127) << sh
            sh += 7
            if not c & 128:
                if c == 0 and sh > 7:
                    raise bad("a frequency not in minimal LEB128 form")
                break
        if not 1 <= v <= 1 << L:
            raise bad("bad frequencies")
        freq.append(v)
    if sum(freq) != 1 << L or len(b) < h + 4 * lanes or (len(b) - h - 4 * lanes) % 2:
        raise bad("bad frequencies or length")
    states = np.frombuffer(b, "<u4", lanes, h).astype(np.uint64)
    if (states < LOW).any():
        raise bad("bad state")
    words = np.frombuffer(b, "<u2", offset=h + 4 * lanes).astype(np.uint64)
    return L, lanes, syms, freq, states, words, mode


def decode(payload, n: int) -> np.ndarray:
    """The ``n`` bytes a payload holds; CorruptFileError when it is not a valid payload for ``n``."""
    L, lanes, syms, freq, x, words, mode = parse(payload)
    if mode == 1:
        t = _decode_symbols(L, lanes, syms, freq, x, words, 2 * n)
        return (t[0::2] | (t[1::2] << 4)).astype(np.uint8)
    return _decode_symbols(L, lanes, syms, freq, x, words, n)


def _decode_symbols(L, lanes, syms, freq, x, words, n: int) -> np.ndarray:
    M = 1 << L
    f = np.array(freq, np.uint64)
    cum = np.concatenate([[0], np.cumsum(f)[:-1]]).astype(np.uint64)
    slot_sym = np.repeat(np.arange(len(freq)), freq)          # slot -> index of its symbol
    sym = np.array(syms, np.uint8)
    out = np.empty(n, np.uint8)
    pos = 0
    x = x.copy()
    for start in range(0, n, lanes):
        cnt = min(lanes, n - start)
        xs = x[:cnt]
        slot = xs & np.uint64(M - 1)
        k = slot_sym[slot.astype(np.int64)]
        out[start:start + cnt] = sym[k]
        xs = f[k] * (xs >> np.uint64(L)) + slot - cum[k]
        need = np.flatnonzero(xs < LOW)                      # in lane order
        if pos + need.size > words.size:
            raise CorruptFileError("an ans chunk is damaged (it ends early)")
        xs[need] = (xs[need] << np.uint64(16)) | words[pos:pos + need.size]
        pos += need.size
        x[:cnt] = xs
    if pos != words.size or (x != LOW).any():
        raise CorruptFileError("an ans chunk is damaged (its states or words do not end where they must)")
    return out
