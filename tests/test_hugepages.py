"""Weight buffers carved from huge-page regions."""

import numpy as np

from lattice_engine.io import hugepages


def test_buffers_are_aligned_disjoint_and_writable():
    a = hugepages.empty((1000, 1088))           # above the threshold: from the arena
    b = hugepages.empty((3000, 34 * 28))
    small = hugepages.empty((4, 4), np.float32)  # below it: plain numpy
    for buf in (a, b):
        assert buf.ctypes.data % hugepages.ALIGN == 0
    # disjoint address ranges: one buffer ends before the other starts (a write-and-read
    # check would miss an overlap of a few bytes written by the later buffer)
    spans = sorted((buf.ctypes.data, buf.ctypes.data + buf.nbytes) for buf in (a, b))
    assert spans[0][1] <= spans[1][0], f"buffers overlap: {spans}"
    a[:] = 1
    b[:] = 2
    assert (a == 1).all() and (b == 2).all()
    assert small.shape == (4, 4) and small.dtype == np.float32


def test_large_buffer_gets_its_own_region():
    big = hugepages.empty((hugepages.CHUNK // 2,))
    assert big.ctypes.data % hugepages.HUGE_PAGE == 0
    big[-1] = 7
    assert big[-1] == 7


def test_zeros_are_zeroed_arrays_of_their_own(tmp_path):
    big = hugepages.zeros((3, 4096, 2, 64), np.float16)   # a KV cache layer: 3 MB
    small = hugepages.zeros((2, 8), np.float32)           # below the threshold: numpy
    assert big.shape == (3, 4096, 2, 64) and big.dtype == np.float16 and not big.any()
    assert big.ctypes.data % hugepages.HUGE_PAGE == 0 and big.flags.c_contiguous
    assert small.shape == (2, 8) and not small.any()
    other = hugepages.zeros(big.shape, big.dtype)
    big[...] = 1
    assert not other.any() and (big == 1).all()


def test_read_into_fills_from_offset(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 10)
    out = hugepages.read_into(path, 5, np.empty((3, 4), np.uint8))
    assert out.reshape(-1).tolist() == list(range(5, 17))
