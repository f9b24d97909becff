"""Weight buffers carved from huge-page regions."""

import numpy as np
import pytest

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


def _file_rss_kb() -> int:
    """Resident pages of mapped files, tmpfs ones (RssShmem) included: tmp_path may be on
    tmpfs."""
    with open("/proc/self/status") as f:
        return sum(int(line.split()[1]) for line in f
                   if line.startswith(("RssFile:", "RssShmem:")))


def test_copy_from_map_leaves_the_mapped_pages_resident_once(tmp_path):
    """A slice of a file's memory map copied into our memory (stacked GGUF experts being
    re-laid): the copy is writable and equal, the slice's whole pages leave this process's
    resident memory, and the map still reads the same bytes afterwards."""
    import os
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc (Linux) to read resident memory")
    data = np.random.default_rng(0).integers(0, 256, 24 << 20, dtype=np.uint8)
    path = tmp_path / "w.bin"
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    view = mapped[4097:(20 << 20) + 5].view(np.ndarray).reshape(-1)  # unaligned ends
    assert int(view.sum(dtype=np.int64)) > 0  # touch every page of the slice
    before = _file_rss_kb()
    copy = hugepages.copy_from_map(view)
    after = _file_rss_kb()
    assert copy.flags.writeable and not isinstance(copy, np.memmap)
    np.testing.assert_array_equal(copy, data[4097:(20 << 20) + 5])
    assert before - after >= 19 << 10  # ~20 MB of file pages released (KB)
    np.testing.assert_array_equal(view, data[4097:(20 << 20) + 5])  # faulted back in
    assert not hugepages.release_mapped(np.zeros(1 << 20, np.uint8))  # not a file map
    # a map that starts inside the file (numpy maps from the allocation boundary below)
    offset = np.memmap(path, dtype=np.uint8, mode="r", offset=70001)
    np.testing.assert_array_equal(hugepages.copy_from_map(offset[123:(1 << 20) + 7]),
                                  data[70001 + 123:70001 + (1 << 20) + 7])
    np.testing.assert_array_equal(hugepages.copy_from_map(data[:5000]), data[:5000])


def test_copy_from_map_of_a_file_that_shrank_is_an_error_not_a_crash(tmp_path):
    """The bytes come from the file, not through the map: a file cut short after it was
    mapped gives EOFError (WeightLoader turns it into a CheckpointError naming the tensor)
    instead of the SIGBUS a read through the map would raise."""
    import os
    path = tmp_path / "w.bin"
    np.arange(1 << 20, dtype=np.uint8).tofile(path)
    view = np.memmap(path, dtype=np.uint8, mode="r")[4096:1 << 19]
    os.truncate(path, 8192)
    with pytest.raises(EOFError, match="bytes missing"):
        hugepages.copy_from_map(view)
