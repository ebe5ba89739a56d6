"""Part sizes of multipart uploads (oss-cse-format.md §6: a multiple of 16, ≥ 100 KiB,
≤ 10,000 parts)."""
from ossfuse.writeback.upload import part_size_for


def test_part_size_is_kept_when_it_fits_and_grown_to_stay_within_10000_parts():
    assert part_size_for(30 << 20, 8 << 20) == 8 << 20
    assert part_size_for(1, 102400) == 102400
    for size in (80_000 * 1024 * 1024 + 7, 10_000 * 102400 + 1, 5 << 40):
        p = part_size_for(size, 102400)
        assert p % 16 == 0 and p >= 102400
        assert -(-size // p) <= 10_000
        assert -(-size // (p - 16)) > 10_000  # the smallest multiple of 16 that fits
