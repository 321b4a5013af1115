"""Counter-based random numbers for the random projectors.

Every random entry of a projection is a pure function of
``(key, counter)``, where ``key`` is derived from ``(seed, ensemble_id, salt)``
and ``counter`` from the global input coordinate (and output column). The
mixing function is the SplitMix64 finaliser evaluated with wrapping ``int64``
torch arithmetic, which gives bit-identical integers on CPU and CUDA. Hence any
block of rows of a projection matrix can be generated on its own, on any device,
in any order, and always equals the same block of the full matrix.

All later steps (bit extraction, table look-up) are exact, so generated
blocks are bit-identical on CPU and CUDA.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

_U64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_KEY_INIT = 0x243F6A8885A308D3


def _to_int64(value: int) -> int:
    """Reinterpret the low 64 bits of ``value`` as a signed int64 Python int.

    Args:
        value: Any Python integer.

    Returns:
        The signed integer with the same low 64 bits.
    """
    value &= _U64
    return value - (1 << 64) if value >> 63 else value


def splitmix64(value: int) -> int:
    """Pure-Python SplitMix64 finaliser (reference for the torch version).

    Args:
        value: Any Python integer (only its low 64 bits are used).

    Returns:
        The mixed value as an unsigned 64-bit Python int.
    """
    z = value & _U64
    z = ((z ^ (z >> 30)) * _MUL1) & _U64
    z = ((z ^ (z >> 27)) * _MUL2) & _U64
    return z ^ (z >> 31)


def derive_key(*parts: int) -> int:
    """Combine integers (seed, ensemble id, salts, ...) into one stream key.

    Args:
        *parts: Integers of any size or sign.

    Returns:
        A signed int64 Python int usable as ``key`` in :func:`hash_grid`.
    """
    h = _KEY_INIT
    for part in parts:
        h = splitmix64((h ^ (int(part) & _U64)) + _GAMMA)
    return _to_int64(h)


def reference_hash(key: int, counter: int) -> int:
    """Pure-Python value of :func:`hash_grid` for one counter (for tests).

    Args:
        key: Stream key (from :func:`derive_key`).
        counter: Non-negative counter.

    Returns:
        The hash as an unsigned 64-bit Python int.
    """
    return splitmix64(key + counter * _GAMMA)


@lru_cache(maxsize=16)
def _constants(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Zero-dim int64 tensors for the multipliers on ``device``.

    Multiplying by a 0-dim tensor is ~50x faster on CPU than by a large Python
    int scalar (which takes a slow generic path).

    Args:
        device: Target device.

    Returns:
        ``(gamma, mul1, mul2)`` as 0-dim int64 tensors.
    """
    return tuple(
        torch.tensor(_to_int64(c), dtype=torch.int64, device=device) for c in (_GAMMA, _MUL1, _MUL2)
    )


def _mix64_(z: Tensor, tmp: Tensor) -> Tensor:
    """In-place SplitMix64 finaliser on an int64 tensor (wrapping arithmetic).

    Args:
        z: int64 tensor, modified in place.
        tmp: int64 scratch tensor of the same shape.

    Returns:
        ``z``.
    """
    _, m1, m2 = _constants(z.device)
    for shift, mult in ((30, m1), (27, m2), (31, None)):
        # logical right shift = arithmetic shift + mask of the low (64 - s) bits
        torch.bitwise_right_shift(z, shift, out=tmp)
        tmp.bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(tmp)
        if mult is not None:
            z.mul_(mult)
    return z


def scratch(
    work: dict[str, Tensor] | None,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Return a scratch tensor of ``shape``, reusing storage kept in ``work``.

    Reusing buffers avoids one large allocation (and its page faults) per op.

    Args:
        work: Dict of cached flat buffers (updated in place) or ``None``.
        name: Buffer name.
        shape: Wanted shape.
        dtype: Wanted dtype.
        device: Wanted device.

    Returns:
        A tensor of ``shape`` with arbitrary content.
    """
    numel = math.prod(shape)
    if work is None:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = work.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        buf = torch.empty(numel, dtype=dtype, device=device)
        work[name] = buf
    return buf[:numel].view(shape)


def hash_grid(
    key: int,
    row0: int,
    nrows: int,
    ncols: int,
    device: torch.device,
    work: dict[str, Tensor] | None = None,
) -> Tensor:
    """Hash the counters ``row * ncols + col`` for a block of rows.

    Args:
        key: Stream key from :func:`derive_key`.
        row0: First global row index.
        nrows: Number of rows in the block.
        ncols: Number of counters per row.
        device: Device to compute on.
        work: Optional dict of reusable scratch buffers.

    Returns:
        int64 tensor of shape ``(nrows, ncols)``; entry ``[i, j]`` has the bits
        of ``reference_hash(key, (row0 + i) * ncols + j)``. It may be a view of
        a buffer in ``work``.
    """
    gamma, _, _ = _constants(device)
    rows = torch.arange(row0, row0 + nrows, dtype=torch.int64, device=device)
    rows.mul_(ncols).mul_(gamma)
    cols = torch.arange(ncols, dtype=torch.int64, device=device).mul_(gamma)
    cols.add_(key)
    z = scratch(work, "z", (nrows, ncols), torch.int64, device)
    torch.add(rows.unsqueeze(1), cols.unsqueeze(0), out=z)
    return _mix64_(z, scratch(work, "t", (nrows, ncols), torch.int64, device))


def _logical_shift(z: Tensor, shift: int, bits: int) -> Tensor:
    """Extract ``bits`` bits of ``z`` starting at bit ``shift``.

    Args:
        z: int64 tensor.
        shift: Lowest bit position.
        bits: Number of bits to keep (``shift + bits <= 64``).

    Returns:
        Non-negative int64 tensor.
    """
    return torch.bitwise_right_shift(z, shift).bitwise_and_((1 << bits) - 1)


@lru_cache(maxsize=8)
def normal_table(device: torch.device) -> Tensor:
    """Equiprobable 16-bit discretisation of N(0, 1), as float16 on ``device``.

    Entry ``b`` is ``Φ⁻¹((b + 0.5) / 65536)``, rescaled so that the table has
    unit second moment; values lie in ``[-4.33, 4.33]``. It is computed on the
    CPU in float64 and then moved, so it is identical on every device.

    Args:
        device: Target device.

    Returns:
        float16 tensor of shape ``(65536,)``.
    """
    quantiles = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
    table = torch.special.ndtri(quantiles)
    table = table / table.square().mean().sqrt()
    return table.to(torch.float16).to(device)


@lru_cache(maxsize=16)
def _table_as(dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`normal_table` converted (exactly) to ``dtype``.

    Args:
        dtype: float16, float32 or float64 (float16 values are exact in both).
        device: Target device.

    Returns:
        Tensor of shape ``(65536,)``.
    """
    return normal_table(device).to(dtype)


def normal_block(
    key: int,
    row0: int,
    nrows: int,
    ncols: int,
    device: torch.device,
    out: Tensor | None = None,
    work: dict[str, Tensor] | None = None,
) -> Tensor:
    """Rows ``[row0, row0 + nrows)`` of a standard-normal matrix (float16 values).

    Each 64-bit hash is split into four 16-bit uniforms (little-endian uint16
    view, the same on CPU and CUDA), each mapped through :func:`normal_table`
    (inverse-CDF method). Entry ``(r, c)`` is
    ``normal_table[(h(r * ceil(k / 4) + c // 4) >> 16 * (c % 4)) & 0xFFFF]``.

    Args:
        key: Stream key.
        row0: First row.
        nrows: Number of rows.
        ncols: Number of columns ``k``.
        device: Device.
        out: Optional destination of shape ``(nrows, ncols)``, float16 or a wider
            float type (the table is gathered in that dtype directly; the values
            are the float16 values, exactly).
        work: Optional dict of reusable scratch buffers.

    Returns:
        Tensor of shape ``(nrows, ncols)`` (``out`` when given, else float16).
    """
    words = (ncols + 3) // 4
    z = hash_grid(key, row0, nrows, words, device, work)
    idx = scratch(work, "i", (nrows, words * 4), torch.int32, device)
    if torch.device(device).type == "cpu":
        idx.copy_(z.view(torch.uint16).view(nrows, words * 4))  # zero-extends: no mask
    else:  # uint16 kernels are not guaranteed off-CPU: sign-extend and mask
        idx.copy_(z.view(torch.int16).view(nrows, words * 4))
        idx.bitwise_and_(0xFFFF)
    if out is None:
        out = torch.empty(nrows, ncols, dtype=torch.float16, device=device)
    table = _table_as(out.dtype, torch.device(device))
    if words * 4 == ncols and out.is_contiguous():
        torch.index_select(table, 0, idx.view(-1), out=out.view(-1))
    else:
        out.copy_(table[idx[:, :ncols]])
    return out


def rademacher_block(
    key: int,
    row0: int,
    nrows: int,
    ncols: int,
    device: torch.device,
    out: Tensor | None = None,
    work: dict[str, Tensor] | None = None,
) -> Tensor:
    """Rows ``[row0, row0 + nrows)`` of a ±1 matrix (float16), 64 signs per hash.

    Args:
        key: Stream key.
        row0: First row.
        nrows: Number of rows.
        ncols: Number of columns ``k``.
        device: Device.
        out: Optional float16 destination of shape ``(nrows, ncols)``.
        work: Optional dict of reusable scratch buffers.

    Returns:
        float16 tensor of shape ``(nrows, ncols)`` with entries ±1.
    """
    words = (ncols + 63) // 64
    z = hash_grid(key, row0, nrows, words, device, work)
    shifts = torch.arange(64, dtype=torch.int64, device=device)
    bits = scratch(work, "b", (nrows, words, 64), torch.int64, device)
    torch.bitwise_right_shift(z.unsqueeze(-1), shifts, out=bits)
    bits.bitwise_and_(1)
    if out is None:
        out = torch.empty(nrows, ncols, dtype=torch.float16, device=device)
    out.copy_(bits.view(nrows, words * 64)[:, :ncols])
    return out.mul_(-2.0).add_(1.0)


def sjlt_block(
    key: int, row0: int, nrows: int, proj_dim: int, nnz: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Buckets and signs of a sparse JL transform for input coordinates.

    Output dimensions are split into ``nnz`` contiguous groups; input coordinate
    ``i`` gets one uniformly random bucket in each group (so its ``nnz``
    buckets are distinct) and an independent random sign for each.

    Args:
        key: Stream key.
        row0: First input coordinate.
        nrows: Number of input coordinates.
        proj_dim: Output dimension ``k`` (``>= nnz``).
        nnz: Non-zeros per input coordinate ``c``.
        device: Device.

    Returns:
        ``(buckets, signs)``: int64 tensor of shape ``(nnz, nrows)`` with values
        in ``[0, proj_dim)`` and float32 tensor of shape ``(nnz, nrows)`` with
        entries ±1 (unscaled).
    """
    z = hash_grid(key, row0, nrows, nnz, device).T
    starts = [j * proj_dim // nnz for j in range(nnz + 1)]
    sizes = torch.tensor(
        [starts[j + 1] - starts[j] for j in range(nnz)],
        dtype=torch.int64,
        device=device,
    )
    offsets = torch.tensor(starts[:-1], dtype=torch.int64, device=device)
    # multiply-high bucket choice: floor(u32 * size / 2**32), exact in int64
    buckets = _logical_shift(z, 32, 32).mul_(sizes.unsqueeze(1))
    buckets = torch.bitwise_right_shift(buckets, 32).add_(offsets.unsqueeze(1))
    signs = z.bitwise_and(1).to(torch.float32).mul_(-2.0).add_(1.0)
    return buckets, signs


def select_coordinates(
    key: int,
    total: int,
    count: int,
    device: torch.device,
    chunk: int = 1 << 22,
) -> Tensor:
    """Uniform random subset of ``count`` of ``range(total)``, sorted ascending.

    Each coordinate gets a 63-bit hash key; the subset is the ``count``
    coordinates with the smallest keys (ties broken by index). It is found in
    one streaming pass with a threshold slightly above the expected
    ``count``-th smallest key, so memory stays ``O(count + chunk)``.

    Args:
        key: Stream key.
        total: Population size.
        count: Subset size (``<= total``).
        device: Device.
        chunk: Coordinates hashed per step.

    Returns:
        int64 tensor of shape ``(count,)`` with sorted distinct indices.
    """
    if count >= total:
        return torch.arange(total, dtype=torch.int64, device=device)
    frac = min(1.0, (count + 6.0 * math.sqrt(count) + 16.0) / total)
    while True:
        limit = (1 << 63) - 1 if frac >= 1.0 else int(frac * 2.0**63)
        keys, idx = [], []
        for start in range(0, total, chunk):
            n = min(chunk, total - start)
            hashed = _logical_shift(hash_grid(key, start, n, 1, device)[:, 0], 1, 63)
            keep = torch.nonzero(hashed <= limit).squeeze(1)
            keys.append(hashed[keep])
            idx.append(keep.add_(start))
        all_keys = torch.cat(keys)
        if all_keys.numel() >= count:
            break
        frac = min(1.0, frac * 2.0)
    # candidates are in index order, so a stable sort breaks key ties by index
    order = torch.sort(all_keys, stable=True).indices[:count]
    return torch.sort(torch.cat(idx)[order]).values
