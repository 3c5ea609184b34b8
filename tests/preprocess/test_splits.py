"""Split modes: stratified (the seed's), group-aware, and HMDB51's official split files."""

from __future__ import annotations

import pytest

from preprocess import shard_format as fmt
from preprocess.shard import PackConfig, PackError, pack
from preprocess.splits import SplitError, read_official, source_of, stratified
from tests.conftest import make_shards, make_videos


def _sides(shard_dir):
    import webdataset as wds

    m = fmt.load_manifest(shard_dir)
    out = {}
    for split in fmt.SPLITS:
        for s in wds.WebDataset(m.urls(split), shardshuffle=False, nodesplitter=None).decode():
            out[s["json"]["path"]] = split
    return out


def test_source_of_hmdb_names():
    assert source_of("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", "brush_hair") == "April_09"
    assert source_of("x/film03_grow_u_nm_np1_fr_med_7.avi", "grow") == "film03"
    assert source_of("x/holiday_clip_12.avi", "jump") == "holiday_clip"


def test_stratified_keeps_class_balance_and_is_seeded():
    labels = [0] * 10 + [1] * 20
    a = stratified(labels, 0.3, seed=0)
    assert a.count("test") == 9
    assert [s for s, y in zip(a, labels) if y == 0].count("test") == 3
    assert stratified(labels, 0.3, seed=0) == a and stratified(labels, 0.3, seed=1) != a


def test_stratified_refuses_singleton_class():
    with pytest.raises(SplitError, match="at least 2 videos in every class"):
        stratified([0, 0, 1], 0.3, 0)


def test_group_split_never_puts_a_source_on_both_sides(tmp_path):
    videos = make_videos(tmp_path / "data", classes=2, clips=16, sources=8)
    sides = _sides(make_shards(videos, tmp_path / "s", split="group", test_size=0.3))
    by_source: dict[str, set] = {}
    for path, side in sides.items():
        cls = path.split("/")[0]
        by_source.setdefault(source_of(path, cls), set()).add(side)
    assert len(by_source) == 8
    assert all(len(s) == 1 for s in by_source.values()), by_source
    assert set(sides.values()) == {"train", "test"}
    assert len(sides) == 32


def _official_folder(root, videos, split_number, assign):
    root.mkdir()
    for cls_dir in sorted(videos.iterdir()):
        lines = [f"{v.name} {assign(v.name)}" for v in sorted(cls_dir.iterdir())]
        (root / f"{cls_dir.name}_test_split{split_number}.txt").write_text("\n".join(lines) + "\n")


def test_official_split_uses_the_files(tmp_path):
    videos = make_videos(tmp_path / "data", classes=2, clips=6)

    def assign(name):  # clip number 0,1 -> test, 2 -> unused, rest -> train
        clip = int(name.rsplit("_", 1)[1].split(".")[0])
        return 2 if clip < 2 else 0 if clip == 2 else 1

    _official_folder(tmp_path / "splits", videos, 2, assign)
    out = make_shards(videos, tmp_path / "s", split="official", official_dir=str(tmp_path / "splits"), split_number=2)
    sides = _sides(out)
    assert len(sides) == 10
    for path, side in sides.items():
        assert side == {2: "test", 1: "train"}[assign(path.split("/")[1])]
    skipped = fmt.load_manifest(out).skipped
    assert sorted(s["path"].split("/")[1].rsplit("_", 1)[1] for s in skipped) == ["2.avi", "2.avi"]
    assert all("official split 2" in s["reason"] for s in skipped)


def test_official_split_errors(tmp_path):
    videos = make_videos(tmp_path / "data", classes=2, clips=2)
    with pytest.raises(PackError, match="not found"):
        pack(PackConfig(str(videos), str(tmp_path / "o"), split="official", official_dir=str(tmp_path / "nope"),
                        progress=False))
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "grow_test_split1.txt").write_text("a.avi 1\n")
    with pytest.raises(SplitError, match="shrink"):
        read_official(tmp_path / "sp", 1, ["grow", "shrink"])
    (tmp_path / "sp" / "shrink_test_split1.txt").write_text("a.avi train\n")
    with pytest.raises(SplitError, match=r"shrink_test_split1.txt:1"):
        read_official(tmp_path / "sp", 1, ["grow", "shrink"])
    with pytest.raises(ValueError, match="--official-dir"):
        PackConfig("a", "b", split="official")
