"""Weight buffers carved from huge-page regions."""

import numpy as np

from lattice_engine.io import hugepages


def test_buffers_are_aligned_disjoint_and_writable():
    a = hugepages.empty((1000, 1088))           # above the threshold: from the arena
    b = hugepages.empty((3000, 34 * 28))
    small = hugepages.empty((4, 4), np.float32)  # below it: plain numpy
    for buf in (a, b):
        assert buf.ctypes.data % hugepages.ALIGN == 0
    a[:] = 1
    b[:] = 2
    assert a.min() == 1 and b.max() == 2          # no overlap
    assert small.shape == (4, 4) and small.dtype == np.float32


def test_large_buffer_gets_its_own_region():
    big = hugepages.empty((hugepages.CHUNK // 2,))
    assert big.ctypes.data % hugepages.HUGE_PAGE == 0
    big[-1] = 7
    assert big[-1] == 7


def test_read_into_fills_from_offset(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 10)
    out = hugepages.read_into(path, 5, np.empty((3, 4), np.uint8))
    assert out.reshape(-1).tolist() == list(range(5, 17))
