"""The host-side coder: exact round trips (escapes included), size vs ideal, bad input."""
import time

import numpy as np
import pytest

from diffjax.entropy import coder
from diffjax.entropy.bitstream import CorruptError
from diffjax.entropy.models import DEFAULT_SCALE_TABLE, gaussian_table
from diffjax.errors import InputError


@pytest.fixture(scope="module")
def table():
    return gaussian_table()


def _gaussian_symbols(n, seed=0, levels=40):
    """Symbols drawn from the table's own Gaussians, with their row indexes."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, levels, n).astype(np.int32)
    scales = np.asarray(DEFAULT_SCALE_TABLE)[idx]
    sym = np.round(rng.standard_normal(n) * scales).astype(np.int32)
    return sym, idx


def test_table_rows_are_valid_quantised_pmfs(table):
    assert table.num_indexes == len(DEFAULT_SCALE_TABLE)
    for f, n in zip(table.freqs, table.lengths):
        row = f[: n + 1]
        assert row.sum() == 1 << coder.PRECISION and row.min() >= 1
        assert not f[n + 1:].any()
    assert table.digest() == gaussian_table().digest()
    other = coder.CdfTable(table.freqs.copy(), table.lengths, table.offsets)
    other.freqs[3, 0] += 1
    assert other.digest() != table.digest()


def test_round_trip_and_size_close_to_ideal(table):
    sym, idx = _gaussian_symbols(150_000)
    sym = sym.reshape(30, 50, 100)
    idx = idx.reshape(30, 50, 100)
    data = coder.encode(sym, idx, table)
    out = coder.decode(data, idx, table)
    assert out.dtype == np.int32 and out.shape == sym.shape
    np.testing.assert_array_equal(out, sym)
    ideal = table.ideal_bits(sym, idx)
    # Coded size vs ideal code length: constriction's ANS is within 0.1 % (+1 word).
    assert len(data) * 8 <= ideal * 1.001 + 64
    assert len(data) * 8 >= ideal * 0.999 - 64
    assert coder.encode(sym, idx, table) == data  # deterministic


def test_escapes_round_trip_exactly(table):
    rng = np.random.default_rng(1)
    n = 5000
    idx = rng.integers(0, table.num_indexes, n).astype(np.int32)
    sym = np.round(rng.standard_normal(n) * 3).astype(np.int64)
    # Far outside every row, both signs, including the largest allowed magnitude.
    far = rng.choice(n, 500, replace=False)
    sym[far] = rng.integers(-(2**30), 2**30, 500)
    sym[:4] = [coder.MAX_ABS_SYMBOL, -coder.MAX_ABS_SYMBOL, 2**16 + 3, -(2**16) - 3]
    edge = table.offsets[idx] + table.lengths[idx]  # first value past each row
    sym[4:10] = edge[4:10]
    sym[10:16] = table.offsets[idx[10:16]] - 1
    sym = sym.astype(np.int32)
    data = coder.encode(sym, idx, table)
    np.testing.assert_array_equal(coder.decode(data, idx, table), sym)
    assert abs(len(data) * 8 - table.ideal_bits(sym, idx)) <= 0.01 * len(data) * 8 + 64


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 1)])
def test_tiny_and_empty_inputs(table, shape):
    sym = np.zeros(shape, np.int32)
    idx = np.full(shape, 5, np.int32)
    data = coder.encode(sym, idx, table)
    np.testing.assert_array_equal(coder.decode(data, idx, table), sym)


def test_invalid_inputs_raise_input_error(table):
    idx = np.zeros(4, np.int32)
    with pytest.raises(InputError, match="shape"):
        coder.encode(np.zeros(3, np.int32), idx, table)
    with pytest.raises(InputError, match="integer"):
        coder.encode(np.zeros(4, np.float32), idx, table)
    with pytest.raises(InputError, match="indexes out of range"):
        coder.encode(np.zeros(4, np.int32), idx + table.num_indexes, table)
    with pytest.raises(InputError, match="exceeds"):
        coder.encode(np.array([0, 0, 0, 2**31 - 1]), idx, table)


def test_damaged_streams_raise_corrupt_error_quickly(table):
    sym, idx = _gaussian_symbols(20_000, seed=2)
    data = coder.encode(sym, idx, table)
    rng = np.random.default_rng(3)
    cases = [data[:-4], data + b"\0\0\0\1", data[:-1], data[:8], b"\0" * 4 + data[4:]]
    for _ in range(150):
        b = bytearray(data)
        pos = rng.integers(0, len(b), rng.integers(1, 4))
        for p in pos:
            b[p] ^= 1 << rng.integers(0, 8)
        cases.append(bytes(b))
    cases += [rng.bytes(len(data)) for _ in range(50)]
    start = time.perf_counter()
    for bad in cases:
        try:
            out = coder.decode(bad, idx, table)
        except CorruptError:
            continue
        # Only a change that leaves the decoded symbols intact may pass (CRC32 inside).
        np.testing.assert_array_equal(out, sym)
    assert time.perf_counter() - start < 30


def test_decoding_with_other_indexes_is_detected(table):
    """A decoder whose indexes differ (e.g. other hyper-decoder floats) must not succeed."""
    sym, idx = _gaussian_symbols(5_000, seed=4)
    data = coder.encode(sym, idx, table)
    other = idx.copy()
    other[::97] = np.minimum(other[::97] + 1, table.num_indexes - 1)
    with pytest.raises(CorruptError):
        coder.decode(data, other, table)
