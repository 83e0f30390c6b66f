"""MicroAdam's fused step on the CPU: every tensor of a chunk in one compiled call (numba), a few passes over
cache-resident data per tensor instead of one full pass per PyTorch op.

``chunk_select(meta, ...)`` runs, per tensor (``meta`` row: gradient and parameter addresses and dtypes, sizes and
offsets into the chunk's flat state, see ``META``):

1. ``a = g + EF`` (EF fp32, or 4-bit codes dequantised as ``code * u + min``) into ``a`` (the fp32 EF itself, or
   ``work``); one streaming pass over the gradient.
2. per top-k row (a block of ``L`` values, or the whole tensor): the canonical top-``K`` of ``|a|`` (values
   compared as int32 bit patterns, ties to the lowest index, indices ascending: ``rows_topk_ref``'s order). A
   sample of the row (about 16 L / K values, whole cache lines) gives a threshold; one pass collects the candidates
   at or above it; a partition of the candidates gives the exact ``K``-th value. Exact whatever the sample: a row
   with fewer than ``K`` or more than ``4 K + 64`` candidates, or with ``8 K > L``, takes a two-pass radix select
   (16 + 15 bits of the key) instead; rows under 4096 values partition all their keys.
3. ring row ``t mod window`` <- (indices, ``a`` there as fp32 or bf16), ``a`` there <- 0; 4-bit EF: block
   min / max, then codes ``trunc(clamp(a * s + o, 0, 15))`` packed two per byte.
4. window moments by segment (a top-k block, or 32768 coordinates of a whole-tensor row: cache-resident scratch):
   ``m += w1[r] * val``, ``v += (w2[r] * val) * val`` over ring rows in ring order; each touched coordinate once,
   ascending (a bitmap of the segment), into a list with ``m * c1`` and ``v * c2``.

Then the caller takes ``sqrt`` of the ``v * c2`` list with torch (torch's CPU sqrt is not always correctly rounded —
15% of random fp32 inputs differ by one ulp from IEEE sqrt on this machine's torch build — and the reference uses
it), and ``chunk_apply`` updates ``p <- p * decay - lr * (mc / (sqrt + eps))`` at the listed coordinates (every
coordinate multiplied by ``decay`` when ``decay != 1``), rounded once to ``p``'s dtype.

Every float op is the reference's (``MicroAdam(fused=False)``, ``fastdp.kernels.ef_quant``,
``microadam_update_ref``), in fp32, in the same order, no FMA (numba contracts nothing without fastmath): the
result equals the reference bit for bit (``tests/methods/test_micro_adam.py``, ``fused_impl``). The reference of
this kernel is the PyTorch fused step (``MicroAdam`` with ``FASTDP_BACKEND=reference``) and the unfused one.
Gradients and parameters are read in place through their addresses (fp32 or bf16, contiguous); the caller keeps
them alive during the call. One thread (torch's other threads stay idle during the call).
"""
from __future__ import annotations

import math

import numpy as np

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    HAS_NUMBA = True
except ImportError:  # the PyTorch fused step runs instead (same results)
    HAS_NUMBA = False

# meta columns, one row per tensor
META = ("g_addr", "g_bf16", "p_addr", "p_bf16", "d", "off", "col", "n", "K", "L", "nb", "cb", "qb", "sample_stride")
G_ADDR, G_BF16, P_ADDR, P_BF16, D, OFF, COL, N, K_, L_, NB, CB, QB, SSTRIDE = range(len(META))
SEGMENT = 32768  # coordinates per update segment of a whole-tensor top-k row
MIN_ROW = 4096  # shorter rows: keys copied and partitioned whole
LINE = 16  # fp32 per 64-byte line: the sample reads whole lines
SAMPLE_EXPECT = 16  # sampled entries expected among a row's top K
MASK_PIECE = 4096  # values per byte-mask piece of the candidate scan
ABS = np.int32(0x7FFFFFFF)  # the int32 bits of |x|: x's bits & ABS


def sample_stride(L: int, K: int) -> int:
    """Lines between sampled lines of a row of ``L`` values with ``K`` picks: about ``16 L / K`` sampled values
    (16 expected among the top K), the stride a prime (no alignment with a weight matrix's row length)."""
    lines = max(1, math.ceil(SAMPLE_EXPECT * L / K / LINE))
    s = max(1, (L // LINE) // lines)
    while s > 2 and any(s % f == 0 for f in range(2, int(s ** 0.5) + 1)):
        s -= 1
    return s


def scratch_sizes(rows) -> dict:
    """Element counts of ``chunk_select``'s scratch for rows [(L, K, stride)]: candidates, sample, picks."""
    cand = max(max(4 * K + 64, L if L < MIN_ROW else 0) for L, K, _ in rows)
    samp = max((L - LINE) // (LINE * s) * LINE + LINE if L >= LINE else L for L, _, s in rows)
    return dict(cand=cand, sample=samp, picks=max(K for _, K, _ in rows))


if HAS_NUMBA:
    _jit = numba.njit(cache=True, error_model="numpy", nogil=True)

    @intrinsic
    def _f32_ptr(typingctx, addr):
        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(sig.return_type))
        return types.CPointer(types.float32)(types.int64), codegen

    @intrinsic
    def _u16_ptr(typingctx, addr):
        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(sig.return_type))
        return types.CPointer(types.uint16)(types.int64), codegen

    @intrinsic
    def _bits(typingctx, x):
        """float32 -> its int32 bit pattern."""
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(32))
        return types.int32(types.float32), codegen

    @intrinsic
    def _from_bits(typingctx, x):
        """int32 bit pattern -> float32."""
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.int32), codegen

    @intrinsic
    def _cttz(typingctx, x):
        """Trailing zero bits of a nonzero uint64."""
        def codegen(context, builder, sig, args):
            return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))
        return types.uint64(types.uint64), codegen

    @_jit
    def _bf16_to_f32(h):
        return _from_bits(np.int32(np.int32(h) << 16))

    @_jit
    def _f32_to_bf16(x):
        """Round to nearest even (torch's conversion), NaN -> 0x7FC0 (torch's scalar conversion; its vectorised one
        gives 0xFFFF: NaN payloads are not part of the bit-for-bit contract); returns the 16 bits as int64."""
        b = np.int64(_bits(x)) & 0xFFFFFFFF
        if (b & 0x7FFFFFFF) > 0x7F800000:
            return np.int64(0x7FC0)
        return (b + 0x7FFF + ((b >> 16) & 1)) >> 16

    @_jit
    def _radix_kth(a, K, hist):
        """(K-th largest key of row ``a`` (int32 view), number of keys above it): two histogram passes (16 + 15 bits)."""
        hist[:] = 0
        for j in range(a.shape[0]):
            hist[(a[j] & ABS) >> 15] += 1
        above, b = 0, 65535
        while above + hist[b] < K:
            above += hist[b]
            b -= 1
        need = K - above
        hist[:32768] = 0
        for j in range(a.shape[0]):
            k = a[j] & ABS
            if (k >> 15) == b:
                hist[k & 0x7FFF] += 1
        above2, lo = 0, 32767
        while above2 + hist[lo] < need:
            above2 += hist[lo]
            lo -= 1
        return np.int32((b << 15) | lo), above + above2

    @_jit
    def _take_row(a, K, kth, above, out):
        """Ascending indices of the canonical top-K of row ``a`` (int32 view) given its K-th key and the count
        above it."""
        quota = K - above
        n = 0
        for j in range(a.shape[0]):
            k = a[j] & ABS
            if k > kth:
                out[n] = j
                n += 1
            elif k == kth and quota > 0:
                quota -= 1
                out[n] = j
                n += 1

    @_jit
    def _take_candidates(cand, ckeys, nc, K, out):
        """The canonical top-K of a row from its candidates (ascending indices ``cand[:nc]``, keys ``ckeys[:nc]``,
        holding every entry at or above the row's K-th key): the K-th key by a partition, then every key above it
        and the lowest-indexed ties."""
        kth = np.partition(ckeys[:nc], nc - K)[nc - K]
        above = 0
        for c in range(nc):
            if ckeys[c] > kth:
                above += 1
        quota = K - above
        n = 0
        for c in range(nc):
            k = ckeys[c]
            if k > kth:
                out[n] = cand[c]
                n += 1
            elif k == kth and quota > 0:
                quota -= 1
                out[n] = cand[c]
                n += 1

    @_jit
    def _row_topk(a, K, stride, out, cand, ckeys, samp, hist, mask):
        """``out[:K]`` <- the canonical top-K indices of a row's keys: ``a`` is the int32 view of the fp32 row
        (``& ABS``: |x|'s bits; keys compared as int32 vectorise, a bitcast per element does not). Module docstring,
        step 2. ``mask``: uint8 scratch [MASK_PIECE]."""
        L = a.shape[0]
        if L < MIN_ROW:  # small row: every key is a candidate
            for j in range(L):
                cand[j] = j
                ckeys[j] = a[j] & ABS
            _take_candidates(cand, ckeys, L, K, out)
            return
        n_lines = (L - LINE) // (LINE * stride) + 1
        m = n_lines * LINE
        expect = m * K / L
        kk = int(math.ceil(expect + 2.5 * math.sqrt(expect) + 1))
        if kk < m and 8 * K <= L:  # else (dense picks): the radix select
            for i in range(n_lines):
                base = i * LINE * stride
                for u in range(LINE):
                    samp[i * LINE + u] = a[base + u] & ABS
            tau = np.partition(samp[:m], m - kk)[m - kk]
            cap = 4 * K + 64
            nc = 0
            words = mask.view(np.uint64)
            for j0 in range(0, L, MASK_PIECE):  # a byte mask per piece (vectorised), then its nonzero 8-byte words
                piece = min(MASK_PIECE, L - j0)
                row = a[j0:j0 + piece]
                for u in range(piece):
                    mask[u] = (row[u] & ABS) >= tau
                for u in range(piece, (piece + 7) & ~7):
                    mask[u] = 0
                for w in range((piece + 7) >> 3):
                    x = words[w]
                    while x != 0:
                        j = j0 + (w << 3) + np.int64(_cttz(x) >> np.uint64(3))
                        x &= x - np.uint64(1)  # bytes are 0 or 1: the lowest set bit is one byte's
                        if nc < cap:
                            cand[nc] = j
                            ckeys[nc] = a[j] & ABS
                        nc += 1
            if K <= nc <= cap:
                _take_candidates(cand, ckeys, nc, K, out)
                return
        kth, above = _radix_kth(a, K, hist)
        _take_row(a, K, kth, above, out)

    @_jit
    def _code(x, s, o):
        """The 4-bit code of x: trunc(clamp(x * s + o, 0, 15)) (int32)."""
        return np.int32(min(max(x * s + o, np.float32(0.0)), np.float32(15.0)))

    @_jit
    def _dequant_add(a, g32, g16, gbf, codes, cb, s0, s1, u, mn):
        """``a[j] = g[j] + (code_j * u + mn)`` for tensor-local j in [s0, s1) (code j: nibble j & 1 of byte
        cb + j // 2), two values per byte in the inner loop."""
        j = s0
        if j & 1 and j < s1:
            gj = _bf16_to_f32(g16[j]) if gbf else g32[j]
            a[j] = gj + (np.float32(np.int32(codes[cb + (j >> 1)]) >> 4) * u + mn)
            j += 1
        npairs = (s1 - j) >> 1
        src = codes[cb + (j >> 1):cb + (j >> 1) + npairs]
        dst = a[j:j + 2 * npairs]
        if gbf:
            gb = g16[j:j + 2 * npairs]
            for k in range(npairs):
                b = np.int32(src[k])
                dst[2 * k] = _bf16_to_f32(gb[2 * k]) + (np.float32(b & 15) * u + mn)
                dst[2 * k + 1] = _bf16_to_f32(gb[2 * k + 1]) + (np.float32(b >> 4) * u + mn)
        else:
            gf = g32[j:j + 2 * npairs]
            for k in range(npairs):
                b = np.int32(src[k])
                dst[2 * k] = gf[2 * k] + (np.float32(b & 15) * u + mn)
                dst[2 * k + 1] = gf[2 * k + 1] + (np.float32(b >> 4) * u + mn)
        j += 2 * npairs
        if j < s1:
            gj = _bf16_to_f32(g16[j]) if gbf else g32[j]
            a[j] = gj + (np.float32(np.int32(codes[cb + (j >> 1)]) & 15) * u + mn)

    @_jit
    def _quantise(a, codes, cb, s0, s1, s, o):
        """Codes of ``a[s0:s1]`` (tensor-local) packed into ``codes[cb:]``: element j to nibble j & 1 of byte
        j // 2 (a block starting at an odd j completes the byte its predecessor began; a lone last element leaves
        the high nibble 0)."""
        j = s0
        if j & 1 and j < s1:
            codes[cb + (j >> 1)] |= np.uint8(_code(a[j], s, o) << 4)
            j += 1
        npairs = (s1 - j) >> 1
        src = a[j:j + 2 * npairs]
        dst = codes[cb + (j >> 1):cb + (j >> 1) + npairs]
        for k in range(npairs):
            dst[k] = np.uint8(_code(src[2 * k], s, o) | (_code(src[2 * k + 1], s, o) << 4))
        j += 2 * npairs
        if j < s1:
            codes[cb + (j >> 1)] = np.uint8(_code(a[j], s, o))

    @_jit
    def _load(p32, p16, bf16, j):
        if bf16:
            return _bf16_to_f32(p16[j])
        return p32[j]

    @_jit
    def _store(p32, p16, bf16, j, x):
        if bf16:
            p16[j] = np.uint16(_f32_to_bf16(x))
        else:
            p32[j] = x

    @_jit
    def _collect_segment(base, lo, hi, ring_idx, rv32, rv16, vbf, col, rows, w1, w2, hp, idx_base, mseg, vseg,
                         seen, d, coord, mc, vc, count):
        """Window moments of one segment (coordinates [base, base + SEGMENT) of a tensor) from ring entries
        ``[lo[r], hi[r])`` of each ring row: every touched coordinate once, ascending, into ``coord``
        (tensor-local), ``mc`` (m * c1) and ``vc`` (v * c2) from ``count`` on; returns the new count. Leaves the
        scratch zero (``seen``: a bitmap of the segment's coordinates, uint64 [SEGMENT / 64])."""
        for r in range(rows):
            for e in range(lo[r], hi[r]):
                idx = np.int64(ring_idx[r, col + e])
                loc = idx - idx_base
                if idx < 0 or base + loc >= d:
                    continue
                val = _bf16_to_f32(rv16[r, col + e]) if vbf else rv32[r, col + e]
                mseg[loc] += w1[r] * val
                vseg[loc] += (w2[r] * val) * val
                seen[loc >> 6] |= np.uint64(1) << np.uint64(loc & 63)
        for w in range(seen.shape[0]):  # touched coordinates in ascending order: the update sweeps p forwards
            x = seen[w]
            if x == 0:
                continue
            seen[w] = 0
            while x != 0:
                loc = (w << 6) + np.int64(_cttz(x))
                x &= x - np.uint64(1)
                coord[count] = base + loc
                mc[count] = mseg[loc] * hp[2]
                vc[count] = vseg[loc] * hp[3]
                count += 1
                mseg[loc] = 0
                vseg[loc] = 0
        return count

    @_jit
    def chunk_apply(meta, hp, coord, mc, sq, starts):
        """Step 4's update, once ``sq`` holds ``sqrt(v * c2)`` (torch's sqrt, as the reference): per tensor i, the
        coordinates ``coord[starts[i]:starts[i + 1]]`` get ``p - lr * (mc / (sq + eps))``; with ``decay != 1``
        every coordinate is first multiplied by it (a bf16 parameter is rounded once, as the reference)."""
        lr, eps, decay = hp[0], hp[1], hp[4]
        for i in range(meta.shape[0]):
            d, pbf = meta[i, D], meta[i, P_BF16] != 0
            p32 = numba.carray(_f32_ptr(meta[i, P_ADDR]), (0 if pbf else d,))
            p16 = numba.carray(_u16_ptr(meta[i, P_ADDR]), (d if pbf else 0,))
            s0, s1 = starts[i], starts[i + 1]
            if decay == np.float32(1.0):
                for c in range(s0, s1):
                    j = coord[c]
                    _store(p32, p16, pbf, j, _load(p32, p16, pbf, j) - lr * (mc[c] / (sq[c] + eps)))
            elif pbf:  # the window's new values from the old p, then the decay everywhere, then those values
                for c in range(s0, s1):
                    mc[c] = _load(p32, p16, pbf, coord[c]) * decay - lr * (mc[c] / (sq[c] + eps))
                for j in range(d):
                    _store(p32, p16, pbf, j, _load(p32, p16, pbf, j) * decay)
                for c in range(s0, s1):
                    _store(p32, p16, pbf, coord[c], mc[c])
            else:
                for j in range(d):
                    p32[j] = p32[j] * decay
                for c in range(s0, s1):
                    j = coord[c]
                    p32[j] = p32[j] - lr * (mc[c] / (sq[c] + eps))

    @_jit
    def chunk_select(meta, ef, codes, ef_min, ef_max, ring_idx, rv32, rv16, row, rows, w1, w2, hp, frugal, q, work,
                     cand, ckeys, samp, hist, picks, mseg, vseg, seen, lo, hi, coord, mc, vc, starts, mask):
        """Steps 1-3 of every tensor in ``meta`` and step 4's window moments (module docstring): the touched
        coordinates of tensor i in ``coord[starts[i]:starts[i + 1]]`` with ``mc`` = m * c1, ``vc`` = v * c2
        (``chunk_apply`` finishes the update). ``ring_idx`` [W, ncols] int16 (block-relative) or int32; ring
        values in ``rv32`` [W, ncols] fp32 or ``rv16`` (bf16 bits) when ``rv32`` has no columns; ``hp`` fp32
        (lr, eps, c1, c2, decay); ``w1``, ``w2`` fp32 [rows]. Returns the number of touched coordinates."""
        count = 0
        F15 = np.float32(15.0)
        vbf = rv32.shape[1] == 0
        for i in range(meta.shape[0]):
            d, off, col, n = meta[i, D], meta[i, OFF], meta[i, COL], meta[i, N]
            K, L, nb, cb, qb = meta[i, K_], meta[i, L_], meta[i, NB], meta[i, CB], meta[i, QB]
            gbf = meta[i, G_BF16] != 0
            g32 = numba.carray(_f32_ptr(meta[i, G_ADDR]), (0 if gbf else d,))
            g16 = numba.carray(_u16_ptr(meta[i, G_ADDR]), (d if gbf else 0,))
            P = nb * L
            # 1. a = g + EF
            if frugal:
                a = work[:P]
                for b in range((d + q - 1) // q):
                    mn = ef_min[qb + b]
                    _dequant_add(a, g32, g16, gbf, codes, cb, b * q, min(d, (b + 1) * q), (ef_max[qb + b] - mn) / F15,
                                 mn)
                a[d:P] = 0
            else:
                a = ef[off:off + P]
                if gbf:
                    for j in range(d):
                        a[j] = _bf16_to_f32(g16[j]) + a[j]
                else:
                    for j in range(d):
                        a[j] = g32[j] + a[j]
            # 2-3. top-k per row into ring row `row`; a there <- 0
            for blk in range(nb):
                ra = a[blk * L:(blk + 1) * L]
                _row_topk(ra.view(np.int32), K, meta[i, SSTRIDE], picks, cand, ckeys, samp, hist, mask)
                for e in range(K):
                    j = picks[e]
                    c = col + blk * K + e
                    ring_idx[row, c] = j
                    if vbf:
                        rv16[row, c] = np.int16(_f32_to_bf16(ra[j]))
                    else:
                        rv32[row, c] = ra[j]
                    ra[j] = 0
            if frugal:
                nq = (d + q - 1) // q
                for b in range(nq):
                    s0, s1 = b * q, min(d, (b + 1) * q)
                    mn = a[s0]
                    mx = a[s0]
                    for j in range(s0 + 1, s1):
                        x = a[j]
                        if x < mn:
                            mn = x
                        if x > mx:
                            mx = x
                    ef_min[qb + b] = mn
                    ef_max[qb + b] = mx
                    u = (mx - mn) / F15
                    sc = np.float32(1.0) / u if u > 0 else np.float32(0.0)
                    _quantise(a, codes, cb, s0, s1, sc, np.float32(0.5) - mn * sc)
            # 4. window moments, by segment
            starts[i] = count
            if nb > 1:  # top-k blocks (block-relative indices): one segment per block
                for blk in range(nb):
                    for r in range(rows):
                        lo[r] = blk * K
                        hi[r] = (blk + 1) * K
                    count = _collect_segment(blk * L, lo, hi, ring_idx, rv32, rv16, vbf, col, rows, w1, w2, hp, 0,
                                             mseg, vseg, seen, d, coord, mc, vc, count)
            else:  # a whole-tensor row: segments of SEGMENT coordinates, each ring row's indices ascending
                for r in range(rows):
                    hi[r] = 0
                for s0 in range(0, d, SEGMENT):
                    for r in range(rows):
                        lo[r] = hi[r]
                        e = lo[r]
                        while e < n and np.int64(ring_idx[r, col + e]) < s0 + SEGMENT:
                            e += 1
                        hi[r] = e
                    count = _collect_segment(s0, lo, hi, ring_idx, rv32, rv16, vbf, col, rows, w1, w2, hp, s0,
                                             mseg, vseg, seen, d, coord, mc, vc, count)
        starts[meta.shape[0]] = count
        return count
