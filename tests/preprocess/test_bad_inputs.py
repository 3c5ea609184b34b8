"""A folder mixing good and broken real videos packs the good ones and reports every skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from preprocess import shard_format as fmt
from preprocess.synth import write_avi
from tests.conftest import REPO, make_videos
from tests.preprocess.videotools import set_avi_frame_count, solid_frames, truncate


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Good sample videos plus one file of every broken kind; returns (root, expected skip reasons)."""
    root = make_videos(tmp_path_factory.mktemp("mixed") / "data", classes=2, clips=4)
    grow, shrink = root / "grow", root / "shrink"
    good = sorted(grow.glob("*.avi"))[0]
    (grow / "empty.avi").write_bytes(b"")
    (grow / "noise.avi").write_bytes(os.urandom(20_000))
    (grow / "notes.avi").write_text("this is not a video\n" * 100)
    (grow / "readme.txt").write_text("not a video either")
    shutil.copy(good, grow / "header_only.avi")
    truncate(grow / "header_only.avi", 0.02)
    shutil.copy(good, grow / "half.avi")
    truncate(grow / "half.avi", 0.5)
    os.symlink(grow / "does-not-exist.avi", grow / "dangling.avi")
    os.mkfifo(grow / "pipe.avi")
    write_avi(shrink / "one_frame.avi", solid_frames(1), fps=25.0)
    write_avi(shrink / "lying_header.avi", solid_frames(20), fps=25.0)
    set_avi_frame_count(shrink / "lying_header.avi", 400)
    write_avi(shrink / "huge.avi", solid_frames(3, size=(3840, 2160)), fps=25.0)
    (shrink / "sub").mkdir()
    shutil.copy(good, shrink / "sub" / "clip ñ 1 é.avi")  # nested, unicode and spaces
    shutil.copy(good, shrink / ".hidden.avi")
    (root / "stray.avi").write_bytes(good.read_bytes())
    expected = {
        "grow/empty.avi": "empty file",
        "grow/noise.avi": "",
        "grow/notes.avi": "",
        "grow/readme.txt": "not a video file name",
        "grow/header_only.avi": "",
        "grow/dangling.avi": "file not found",
        "grow/pipe.avi": "not a regular file",
        "stray.avi": "not inside a class folder",
    }
    return root, expected


def _run(root, out, *extra):
    return subprocess.run([sys.executable, "-m", "preprocess.shard", str(root), str(out), "--no-progress",
                           "--workers", "2", "--shard-size", "3", *extra],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_mixed_folder_packs_good_and_reports_each_skip(mixed, tmp_path):
    root, expected = mixed
    r = _run(root, tmp_path / "s")
    assert r.returncode == 0, r.stderr
    m = fmt.load_manifest(tmp_path / "s")
    reasons = {s["path"]: s["reason"] for s in m.skipped}
    assert set(reasons) == set(expected)
    for path, words in expected.items():
        assert words in reasons[path], (path, reasons[path])
        assert path in r.stderr  # the summary names each skipped file
    assert f"skipped {len(expected)}" in r.stderr
    # 8 good + half-truncated + one frame + lying header + huge + nested unicode = 13 packed
    assert m.count("train") + m.count("test") == 13
    metas = {}
    import webdataset as wds

    for split in fmt.SPLITS:
        for s in wds.WebDataset(m.urls(split), shardshuffle=False, nodesplitter=None).decode("rgb"):
            frames, _, meta = fmt.split_sample(s, 16)
            assert all(min(f.shape[:2]) == 128 for f in frames)
            metas[meta["path"]] = meta
    assert ".hidden.avi" not in json.dumps(list(metas))
    assert metas["shrink/one_frame.avi"]["repeated"] and metas["shrink/one_frame.avi"]["indices"] == [0] * 16
    lying = metas["shrink/lying_header.avi"]
    assert lying["header_frames"] == 400 and lying["n_decoded"] == 20
    half = metas["grow/half.avi"]
    assert 0 < half["n_decoded"] < half["header_frames"]
    assert metas["shrink/huge.avi"]["orig_size"] == [3840, 2160]
    assert "shrink/sub/clip ñ 1 é.avi" in metas
    # No partial shard: every tar is complete and matches its manifest entry; no temp file left.
    assert not list((tmp_path / "s").glob("*.tmp"))
    for split in fmt.SPLITS:
        for info in m.shards[split]:
            assert fmt.sha256_file(tmp_path / "s" / info.name) == info.sha256


def _unprivileged(cmd: list[str]) -> list[str]:
    """Run ``cmd`` without the root capabilities that bypass file permissions."""
    if os.geteuid() != 0:
        return cmd
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a file unreadable to the packer")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]


def test_unreadable_file_is_skipped(tmp_path):
    root = make_videos(tmp_path / "data", classes=2, clips=2)
    locked = root / "grow" / "locked.avi"
    shutil.copy(sorted((root / "grow").glob("*.avi"))[0], locked)
    locked.chmod(0)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "preprocess.shard", str(root), str(out), "--no-progress", "--workers", "1",
           "--test-size", "0.5"]
    r = subprocess.run(_unprivileged(cmd), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    skipped = fmt.load_manifest(out).skipped
    assert skipped == [{"path": "grow/locked.avi", "reason": "file is not readable (permissions)"}]


def test_strict_fails_and_keeps_no_shards(mixed, tmp_path):
    root, _ = mixed
    r = _run(root, tmp_path / "s", "--strict")
    assert r.returncode == 1 and "--strict" in r.stderr and "grow/empty.avi" in r.stderr
    assert not list((tmp_path / "s").iterdir())


def test_nothing_usable_fails_with_reasons(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        (tmp_path / "data" / cls / "x.avi").write_bytes(os.urandom(5000))
        (tmp_path / "data" / cls / "y.avi").write_bytes(b"")
    r = _run(tmp_path / "data", tmp_path / "s")
    assert r.returncode == 1
    assert "none of the 4 videos" in r.stderr and "a/y.avi: empty file" in r.stderr
    assert not list((tmp_path / "s").iterdir())
