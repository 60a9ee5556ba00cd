import pytest

from stages.ingest import tags


def test_split_tags_normalises_and_dedupes():
    assert tags.split_tags(" Long_Hair ,  blue  eyes,,long_hair ") == ["Long_Hair", "blue eyes", "long_hair"]
    assert tags.split_tags("Long_Hair, long hair", lowercase=True, underscores_to_spaces=True) == ["long hair"]
    assert tags.split_tags("a | b|c", separator="|") == ["a", "b", "c"]
    assert tags.split_tags("") == []


def test_tag_weights_by_hand():
    # counts 1, 4, 16 -> median 4; power 0.5 -> weights 2, 1, 0.5
    w = tags.tag_weights({"rare": 1, "mid": 4, "common": 16}, power=0.5)
    assert w == pytest.approx({"rare": 2.0, "mid": 1.0, "common": 0.5})
    assert tags.raw_item_weight(["rare", "common"], w) == pytest.approx(1.25)
    assert tags.raw_item_weight([], w) == 1.0


def test_normalise_then_clamp_by_hand():
    # raw 1, 2, 3 -> mean 2 -> 0.5, 1, 1.5 -> clamp [0.6, 1.4] -> 0.6, 1, 1.4
    assert tags.normalise_weights([1, 2, 3], 0.6, 1.4) == pytest.approx([0.6, 1.0, 1.4])
    assert tags.normalise_weights([], 0.5, 2) == []
