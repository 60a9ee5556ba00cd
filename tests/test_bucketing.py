import math
import random

import pytest

from stages.bucket import geometry as bk


def test_generated_buckets_obey_area_multiples_and_ratio():
    buckets = bk.generate_buckets(1024 * 1024, 64, 512, 2048, 4.0)
    assert (1024, 1024) in buckets
    for known in [(832, 1216), (1216, 832), (896, 1152), (768, 1344), (512, 2048), (2048, 512)]:
        assert known in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= 1024 * 1024
        assert max(w / h, h / w) <= 4.0
        assert 512 <= w <= 2048 and 512 <= h <= 2048
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    assert all(b[::-1] in buckets for b in buckets)


def test_max_ratio_limits_generated_buckets():
    assert all(max(w / h, h / w) <= 2.0 for w, h in bk.generate_buckets(1024 * 1024, max_ratio=2.0))


def test_nearest_bucket_by_log_aspect():
    buckets = [(1024, 1024), (1152, 896), (896, 1152), (1344, 768), (768, 1344)]
    assert bk.nearest_bucket(1000, 1000, buckets) == (1024, 1024)
    assert bk.nearest_bucket(1920, 1080, buckets) == (1344, 768)   # 1.78 vs 1.75
    assert bk.nearest_bucket(1080, 1920, buckets) == (768, 1344)
    assert bk.nearest_bucket(1300, 1000, buckets) == (1152, 896)   # 1.30 vs 1.286
    # a square image is equally far (in log aspect) from 1:4 and 4:1: larger area wins, then smaller width
    assert bk.nearest_bucket(700, 700, [(256, 1024), (2048, 512)]) == (2048, 512)
    assert bk.nearest_bucket(700, 700, [(2048, 512), (512, 2048)]) == (512, 2048)


@pytest.mark.parametrize("size", [(1920, 1080), (500, 700), (4000, 3000), (333, 1999), (1024, 1024)])
def test_cover_resize_covers_and_keeps_aspect(size):
    w, h = size
    bucket = bk.nearest_bucket(w, h, bk.generate_buckets(1024 * 1024))
    rw, rh, scale = bk.cover_resize(w, h, bucket)
    assert rw >= bucket[0] and rh >= bucket[1]
    assert rw == bucket[0] or rh == bucket[1]          # one side exact: no needless crop
    assert abs(rw / rh - w / h) < 0.01 * (w / h) + 2 / min(rw, rh)
    assert scale == pytest.approx(max(bucket[0] / w, bucket[1] / h))


def test_crop_offsets_stay_inside():
    assert bk.crop_offset((1400, 1024), (1024, 1024), "center") == (188, 0)
    rng = random.Random(1)
    for _ in range(200):
        left, top = bk.crop_offset((1400, 1100), (1024, 1024), "random", rng)
        assert 0 <= left <= 376 and 0 <= top <= 76
    a = bk.crop_offset((1400, 1100), (1024, 1024), "random", random.Random("0:abc"))
    assert a == bk.crop_offset((1400, 1100), (1024, 1024), "random", random.Random("0:abc"))


def test_aspect_error_and_cropped_share_by_hand():
    assert bk.aspect_error(2000, 1000, (1024, 1024)) == pytest.approx(math.log(2))
    assert bk.cropped_share((2048, 1024), (1024, 1024)) == pytest.approx(0.5)


def test_merge_small_folds_into_nearest_neighbour():
    counts = {(1024, 1024): 10, (1152, 896): 2, (1344, 768): 1, (768, 1344): 7, (640, 1536): 0}
    target = bk.merge_small(counts, min_items=3)
    # smallest first: 1344x768 (1) -> nearest live 1152x896; then 1152x896 (3) is big enough
    assert target[(1344, 768)] == (1152, 896)
    assert target[(1152, 896)] == (1152, 896)
    assert target[(1024, 1024)] == (1024, 1024)
    assert (640, 1536) not in target
    merged = {}
    for src, dst in target.items():
        merged[dst] = merged.get(dst, 0) + counts[src]
    assert all(n >= 3 for n in merged.values())
    assert bk.merge_small({(1024, 1024): 1, (1152, 896): 1}, 5) in (
        {(1024, 1024): (1152, 896), (1152, 896): (1152, 896)}, {(1024, 1024): (1024, 1024), (1152, 896): (1024, 1024)})
    assert bk.merge_small(counts, 1) == {b: b for b, n in counts.items() if n}
