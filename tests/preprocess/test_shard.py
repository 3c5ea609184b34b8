"""Packing round trip, determinism, atomicity and the CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import cv2
import numpy as np
import pytest
import webdataset as wds

from preprocess import shard_format as fmt
from preprocess.frames import read_clip, select_indices
from tests.conftest import REPO, make_shards, make_videos


def _read_all(shard_dir):
    manifest = fmt.load_manifest(shard_dir)
    out = {}
    for split in fmt.SPLITS:
        urls = manifest.urls(split)
        if not urls:
            out[split] = []
            continue
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None).decode("rgb")
        out[split] = list(ds)
    return manifest, out


def test_round_trip_with_plain_webdataset(sample_videos, sample_shards):
    manifest, samples = _read_all(sample_shards)
    videos = sorted(p.relative_to(sample_videos).as_posix() for p in sample_videos.rglob("*.avi"))
    assert manifest.classes == ["grow", "shrink"]
    assert manifest.count("train") + manifest.count("test") == len(videos) == 24
    assert manifest.skipped == []
    seen = []
    for split, rows in samples.items():
        assert len(rows) == manifest.count(split)
        for s in rows:
            frames, label, meta = fmt.split_sample(s, manifest.n_frames)
            assert len(frames) == 16 and all(f.shape == frames[0].shape for f in frames)
            assert min(frames[0].shape[:2]) == 48
            assert manifest.classes[label] == meta["class"] == meta["path"].split("/")[0]
            assert meta["indices"] == select_indices(meta["n_decoded"], 16)
            seen.append(meta["path"])
            # Frames are the decoder's frames, in order: each stored frame is closest (JPEG loss aside)
            # to the decoded frame it claims to be.
            ref = read_clip(sample_videos / meta["path"], 16, short_side=48)
            refs = np.stack([f[..., ::-1] for f in ref.frames]).astype(np.float32)
            for i, got in enumerate(frames):
                diffs = np.abs(refs - got.astype(np.float32) * 255).mean(axis=(1, 2, 3))
                assert ref.indices[int(diffs.argmin())] == ref.indices[i] and diffs[i] < 12, diffs
            per_class = manifest.per_class[split]
        assert sum(per_class.values()) == manifest.count(split)
    assert sorted(seen) == videos  # every video exactly once


def test_shards_readable_by_tar_and_match_manifest(sample_shards):
    manifest = fmt.load_manifest(sample_shards)
    for split in fmt.SPLITS:
        for info in manifest.shards[split]:
            path = sample_shards / info.name
            assert fmt.sha256_file(path) == info.sha256
            names = subprocess.run(["tar", "tf", str(path)], capture_output=True, text=True, check=True).stdout.split()
            keys = {n.split(".", 1)[0] for n in names}
            assert len(keys) == info.count
            assert all("." not in k for k in keys)
            assert len(names) == info.count * (16 + 2)
    assert not list(sample_shards.glob("*.tmp"))


def _tarfile_bytes(samples) -> bytes:
    """What Python's tarfile writes for ``samples`` with the fields ShardWriter fixes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, frames, label, meta in samples:
            members = list(zip(fmt.frame_fields(len(frames)), frames))
            members += [(fmt.LABEL_FIELD, str(label).encode()),
                        (fmt.META_FIELD, json.dumps(meta, sort_keys=True).encode())]
            for name, data in members:
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data), 0, 0o644, 0, 0, "", "")
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("n_samples", [0, 1, 7])
def test_shard_writer_writes_what_tarfile_writes(tmp_path, n_samples):
    rng = np.random.default_rng(n_samples)
    sizes = [0, 1, 511, 512, 513, 4096]  # padding edge cases, then random sizes
    samples = [(fmt.sample_key(i), [rng.bytes(int(sizes[j]) if j < len(sizes) else int(rng.integers(0, 5000)))
                                    for j in range(16)], int(rng.integers(0, 51)), {"path": f"cls/vid é {i}.avi"})
               for i in range(n_samples)]
    w = fmt.ShardWriter(tmp_path / "x.tar")
    for s in samples:
        w.write(*s)
    info = w.close()
    got = (tmp_path / "x.tar").read_bytes()
    assert got == _tarfile_bytes(samples)
    assert info["sha256"] == fmt.sha256_file(tmp_path / "x.tar") and info["count"] == n_samples
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        fmt.tar_header("k" * 101, 1)


def test_same_input_gives_byte_identical_output_for_any_worker_count(sample_videos, tmp_path):
    a = make_shards(sample_videos, tmp_path / "a", shard_size=5, workers=1)
    b = make_shards(sample_videos, tmp_path / "b", shard_size=5, workers=2)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_rerun_into_same_folder_replaces_stale_shards(sample_videos, tmp_path):
    out = make_shards(sample_videos, tmp_path / "s", shard_size=2)
    many = sorted(p.name for p in out.glob("*.tar"))
    make_shards(sample_videos, out, shard_size=100)
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "train-000000.tar"]
    assert len(many) > 2


def _pack_cmd(src, dst, *extra):
    return [sys.executable, "-m", "preprocess.shard", str(src), str(dst), "--no-progress", *extra]


def test_interrupted_run_leaves_nothing_that_looks_complete_and_rerun_matches(tmp_path):
    videos = make_videos(tmp_path / "data", classes=2, clips=40, size=(96, 72), min_len=60, max_len=90)
    ref = tmp_path / "ref"
    subprocess.run(_pack_cmd(videos, ref, "--shard-size", "2", "--workers", "1"), check=True, timeout=300, cwd=REPO)
    out = tmp_path / "out"
    p = subprocess.Popen(_pack_cmd(videos, out, "--shard-size", "2", "--workers", "1"), cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob(".staging-*/*.tar"))) < 2:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    staged = list(out.glob(".staging-*/*.tar"))
    assert staged, "packer was killed before it wrote a shard; test needs more videos"
    # Shards are built in a staging folder: nothing in the output folder looks like a shard set.
    assert not (out / fmt.MANIFEST_NAME).exists() and not list(out.glob("*.tar"))
    for t in staged:  # every file named like a shard is a complete tar
        with tarfile.open(t) as tf:
            assert len(tf.getnames()) == 2 * 18
    r = subprocess.run(_pack_cmd(videos, out, "--shard-size", "2", "--workers", "2"), capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "taking over the stale lock" in r.stderr  # the killed packer's lock
    # The killed run's staging folder and lock are gone; the set is the same as an uninterrupted run's.
    assert sorted(x.name for x in out.iterdir()) == sorted(x.name for x in ref.iterdir())
    for x in ref.iterdir():
        assert (out / x.name).read_bytes() == x.read_bytes(), x.name


def test_sigint_aborts_cleanly(tmp_path):
    videos = make_videos(tmp_path / "data", classes=2, clips=30, size=(96, 72), min_len=60, max_len=90)
    out = tmp_path / "out"
    p = subprocess.Popen(_pack_cmd(videos, out, "--shard-size", "1000", "--workers", "1"), cwd=REPO,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(out.glob(".staging-*/*.tmp")):
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err and "no complete shard set" in err
    assert list(out.iterdir()) == []  # no temporary file, staging folder or lock left


def test_manifest_records_arguments_and_metadata(sample_shards):
    raw = json.loads((sample_shards / fmt.MANIFEST_NAME).read_text())
    assert raw["format_version"] == fmt.FORMAT_VERSION
    assert raw["args"]["frames"] == 16 and raw["args"]["short_side"] == 48 and raw["args"]["split"] == "stratified"
    assert "workers" not in raw["args"]  # output does not depend on it
    assert raw["splits"]["train"]["count"] == 16 and raw["splits"]["test"]["count"] == 8  # 0.3 of 24, stratified
    assert raw["splits"]["test"]["per_class"] == {"grow": 4, "shrink": 4}


def test_classes_are_sorted_folder_names(tmp_path):
    for name in ("zeta", "Alpha", "beta"):
        make_videos(tmp_path / "tmp" / name, classes=2, clips=2)
        (tmp_path / "data" / name).mkdir(parents=True)
        for v in (tmp_path / "tmp" / name / "grow").iterdir():
            v.rename(tmp_path / "data" / name / v.name)
    out = make_shards(tmp_path / "data", tmp_path / "s", test_size=0.5)
    assert fmt.load_manifest(out).classes == ["Alpha", "beta", "zeta"]


def test_cli_errors(tmp_path):
    r = subprocess.run(_pack_cmd(tmp_path / "missing", tmp_path / "o"), capture_output=True, text=True, timeout=60,
                       cwd=REPO)
    assert r.returncode == 1 and "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = subprocess.run(_pack_cmd(tmp_path / "empty", tmp_path / "o"), capture_output=True, text=True, timeout=60,
                       cwd=REPO)
    assert r.returncode == 1 and "no videos found" in r.stderr
    r = subprocess.run(_pack_cmd(tmp_path / "empty", tmp_path / "o", "--quality", "0"), capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and "--quality" in r.stderr


def test_preview_contact_sheet(sample_shards, tmp_path):
    out = tmp_path / "p.png"
    subprocess.run([sys.executable, "-m", "preprocess.preview", str(sample_shards), "--out", str(out),
                    "--samples", "3", "--thumb", "32"], check=True, timeout=60, cwd=REPO)
    img = cv2.imread(str(out))
    assert img.shape[0] == 3 * (32 + 2)
    assert img.shape[1] > 16 * 32


@pytest.mark.parametrize("bad", ["missing", "garbage"])
def test_load_manifest_errors(tmp_path, bad):
    if bad == "garbage":
        (tmp_path / fmt.MANIFEST_NAME).write_text("{not json")
    with pytest.raises((FileNotFoundError, ValueError), match="preprocess.shard"):
        fmt.load_manifest(tmp_path)
