"""The packer protects what it does not own and survives bad inputs: foreign files, overlapping folders,
failed and killed reruns, crashing and stuck decoders, huge videos, odd file names, symlinks, two packers."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import webdataset as wds

from preprocess import shard_format as fmt
from preprocess import workers
from preprocess.shard import PackError
from preprocess.synth import write_avi
from tests.conftest import REPO, make_shards, make_videos
from tests.preprocess.test_bad_inputs import _unprivileged
from tests.preprocess.videotools import solid_frames


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """2 classes x 3 short clips; read-only for tests."""
    return make_videos(tmp_path_factory.mktemp("protect") / "data", classes=2, clips=3, min_len=8, max_len=12)


def _cli(src, dst, *extra):
    return [sys.executable, "-m", "preprocess.shard", str(src), str(dst), "--no-progress", *extra]


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, **kw)


def _files(folder):
    """Every non-hidden file of ``folder`` with its bytes."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def _packed_paths(out):
    m = fmt.load_manifest(out)
    return sorted(fmt.split_sample(s, m.n_frames)[2]["path"] for split in fmt.SPLITS
                  for s in wds.WebDataset(m.urls(split), shardshuffle=False, nodesplitter=None).decode("rgb"))


def test_files_that_are_not_ours_are_never_deleted(videos, tmp_path):
    readme = tmp_path / "s" / "README.md"
    readme.parent.mkdir()
    readme.write_text("what these shards are\n")
    make_shards(videos, readme.parent)  # a README (as in the repository's shards/) is no reason to refuse
    assert readme.read_text() == "what these shards are\n"

    out = tmp_path / "photos"
    out.mkdir()
    for name in ("photos-000042.tar", "notes.tmp", "train.tar"):
        (out / name).write_bytes(b"someone else's " + name.encode())
    (out / ".staging-1-abc").mkdir()  # named like our staging folder, but holding a file of someone else's
    (out / ".staging-1-abc" / "photo.jpg").write_bytes(b"jpeg")
    before = _files(out)
    with pytest.raises(PackError, match=r"not a shard folder: it holds 3 entries .*\(notes\.tmp, photos-000042\.tar, "
                                        r"train\.tar\).*--force"):
        make_shards(videos, out)
    assert _files(out) == before and sorted(p.name for p in out.iterdir()) == [".staging-1-abc", *sorted(before)]
    make_shards(videos, out, force=True)
    make_shards(videos, out, shard_size=1)  # now it holds a shard set of ours: no --force needed
    assert {n: b for n, b in _files(out).items() if n in before} == before
    assert (out / ".staging-1-abc" / "photo.jpg").read_bytes() == b"jpeg"
    assert len(fmt.load_manifest(out).urls("train")) == 4


@pytest.mark.parametrize("where", ["inside", "around", "same"])
def test_output_and_input_folders_must_not_overlap(videos, where):
    out = {"inside": videos / "shards", "around": videos.parent, "same": videos}[where]
    words = {"inside": "is inside the input folder", "around": "is inside the output folder",
             "same": "are the same folder"}[where]
    with pytest.raises(PackError, match=words):
        make_shards(videos, out)
    assert not (videos / "shards").exists() and not (videos / fmt.MANIFEST_NAME).exists()


def test_failed_rerun_keeps_the_previous_set(videos, tmp_path):
    out = make_shards(videos, tmp_path / "s", shard_size=1)
    before = _files(out)
    src = tmp_path / "more"
    shutil.copytree(videos, src)
    (src / "grow" / "empty.avi").write_bytes(b"")
    with pytest.raises(PackError, match="--strict.*the previous shard set in .* is unchanged"):
        make_shards(src, out, shard_size=100, strict=True)
    assert _files(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_killed_rerun_keeps_the_previous_set_and_one_packer_at_a_time(videos, tmp_path, capsys):
    out = make_shards(videos, tmp_path / "s", shard_size=1)
    before = _files(out)
    stuck = sorted((videos / "shrink").glob("*.avi"))[0].name
    # The rerun cannot finish before it is killed:
    env = {**os.environ, workers.FAULT_INJECTION: "1", workers.TEST_HANG_ON: stuck}
    first = subprocess.Popen(_cli(videos, out, "--shard-size", "100", "--workers", "1"), cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob(".staging-*")) and (out / fmt.MANIFEST_NAME).exists():
            assert time.monotonic() < deadline, "the rerun did not start"
            time.sleep(0.05)
        with pytest.raises(PackError, match=f"another packer is writing to {out}: .pack.lock is held by pid "
                                            f"{first.pid} on host "):
            make_shards(videos, out)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert _files(out) == before  # the killed rerun replaced nothing: manifest and shards as they were
    assert len(fmt.load_manifest(out).urls("train")) == 4
    make_shards(videos, out, shard_size=100)
    assert f"taking over the stale lock {out / '.pack.lock'} of pid {first.pid}" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [  # staging folder, lock and the old set's extra shards gone
        "manifest.json", "test-000000.idx", "test-000000.tar", "train-000000.idx", "train-000000.tar",
        "wids-test.json", "wids-train.json"]


def test_lock_of_a_packer_on_another_host_is_respected(videos, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    lock = {"host": "node-elsewhere", "pid": 4242, "time": "2025-01-01T00:00:00"}
    (out / ".pack.lock").write_text(json.dumps(lock))
    with pytest.raises(PackError, match=r"held by pid 4242 on host node-elsewhere .*delete .*\.pack\.lock"):
        make_shards(videos, out)
    assert json.loads((out / ".pack.lock").read_text()) == lock and sorted(out.iterdir()) == [out / ".pack.lock"]
    gone = subprocess.Popen(["true"])
    gone.wait()
    (out / ".pack.lock").write_text(json.dumps({**lock, "host": socket.gethostname(), "pid": gone.pid}))
    make_shards(videos, out)  # same host, process gone: a stale lock, taken over
    assert not (out / ".pack.lock").exists()


def test_decoder_crash_costs_one_video_whatever_the_workers(videos, tmp_path, monkeypatch):
    culprit = sorted((videos / "shrink").glob("*.avi"))[1].name
    monkeypatch.setenv(workers.FAULT_INJECTION, "1")
    monkeypatch.setenv(workers.TEST_CRASH_ON, culprit)  # the worker kills itself with SIGSEGV on this video
    a = make_shards(videos, tmp_path / "a", shard_size=2, workers=1)
    b = make_shards(videos, tmp_path / "b", shard_size=2, workers=2)
    assert fmt.load_manifest(a).skipped == [{"path": f"shrink/{culprit}", "reason": "decoder crashed: the worker "
                                             "process died (killed by SIGSEGV) on this video"}]
    assert len(_packed_paths(a)) == 5
    assert _files(a) == _files(b)


@pytest.mark.timeout(120)
def test_stuck_decoder_is_stopped_at_the_time_limit(videos, tmp_path, monkeypatch):
    stuck = sorted((videos / "grow").glob("*.avi"))[0].name
    monkeypatch.setenv(workers.FAULT_INJECTION, "1")
    monkeypatch.setenv(workers.TEST_HANG_ON, stuck)
    start = time.monotonic()
    out = make_shards(videos, tmp_path / "s", workers=2, video_timeout=3)
    assert time.monotonic() - start < 60
    assert fmt.load_manifest(out).skipped == [
        {"path": f"grow/{stuck}", "reason": "took longer than the --video-timeout of 3 s; its worker was stopped"}]
    assert len(_packed_paths(out)) == 5
    assert multiprocessing.active_children() == []  # the stuck worker was killed, the others stopped


def test_videos_over_the_size_or_length_limits_are_skipped(tmp_path):
    root = make_videos(tmp_path / "data", classes=2, clips=2, min_len=8, max_len=12)
    write_avi(root / "grow" / "wide.avi", solid_frames(3, size=(640, 480)), fps=25.0)
    write_avi(root / "shrink" / "long.avi", solid_frames(40), fps=25.0)
    out = make_shards(root, tmp_path / "s", test_size=0.5, max_pixels=100_000, max_frames=30)
    assert fmt.load_manifest(out).skipped == [
        {"path": "grow/wide.avi", "reason": "frames of 640x480 (307200 pixels) are over the --max-pixels limit of "
                                            "100000; raise it to pack this video"},
        {"path": "shrink/long.avi", "reason": "more than 30 frames decode (the --max-frames limit); "
                                              "raise it to pack this video"}]
    assert len(_packed_paths(out)) == 4


def test_any_file_name_is_packed_and_reported_escaped(tmp_path):
    root = tmp_path / os.fsdecode(b"d\xe4ta")  # OpenCV crashes writing to such a name: write, then rename
    make_videos(tmp_path / "data", classes=2, clips=2, min_len=8, max_len=12).rename(root)
    good = sorted((root / "grow").glob("*.avi"))
    shutil.copy(good[0], root / "grow" / os.fsdecode(b"caf\xe9.avi"))  # Latin-1 bytes: not UTF-8
    shutil.copy(good[1], root / "grow" / "new\nline.avi")
    (root / os.fsdecode(b"s\xfcd")).mkdir()  # a class folder with such a name
    for name in ("a.avi", "b.avi"):
        shutil.copy(good[0], root / os.fsdecode(b"s\xfcd") / name)
    (root / "grow" / "bad\nname.txt").write_text("not a video")
    r = _run(_cli(root, tmp_path / "s", "--test-size", "0.5", "--workers", "1"))
    assert r.returncode == 0, r.stderr
    m = fmt.load_manifest(tmp_path / "s")
    assert m.classes == ["grow", "shrink", "s\\xfcd"] and m.args["input"].endswith("d\\xe4ta")
    assert m.skipped == [{"path": "grow/bad\\nname.txt", "reason": "not a video file name (extension '.txt')"}]
    assert "  grow/bad\\nname.txt: not a video file name (extension '.txt')" in r.stderr.splitlines()
    paths = _packed_paths(tmp_path / "s")
    assert "grow/caf\\xe9.avi" in paths and "grow/new\\nline.avi" in paths and "s\\xfcd/a.avi" in paths
    assert len(paths) == 8


def test_symlinks_never_pack_a_video_twice(tmp_path):
    root = make_videos(tmp_path / "data", classes=2, clips=3, min_len=8, max_len=12)
    real = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.avi"))
    first = real[0]  # grow/...
    os.symlink(root, root / "zz")  # the input folder again, as a class
    os.symlink(first.split("/")[1], root / "grow" / "0_link.avi")  # a second name of a video, sorted first
    os.symlink("../grow", root / "shrink" / "more")  # another class's folder inside this one
    (root / "grow" / "sub").mkdir()
    os.symlink("../..", root / "grow" / "sub" / "up")  # back up to the input folder
    os.symlink("self.avi", root / "grow" / "self.avi")
    out = make_shards(root, tmp_path / "s")
    m = fmt.load_manifest(out)
    reasons = {s["path"]: s["reason"] for s in m.skipped}
    assert m.classes == ["grow", "shrink"]
    assert reasons["zz"] == "symlink loop (leads to the input folder or above it); not a class"
    assert reasons["grow/sub/up"] == "symlink loop (leads back to a folder above it); not walked"
    assert reasons["grow/self.avi"] == "symlink loop (the link points at itself)"
    assert reasons["grow/0_link.avi"] == f"duplicate of {first} (the same file, reached through a link)"
    for rel in real[:3]:
        assert reasons[rel.replace("grow/", "shrink/more/")].startswith(f"duplicate of {rel} ")
    assert _packed_paths(out) == real  # every video once, under its own class


def test_folder_that_cannot_be_listed_is_reported(tmp_path):
    root = make_videos(tmp_path / "data", classes=2, clips=2, min_len=8, max_len=12)
    locked = root / "grow" / "locked"
    locked.mkdir()
    shutil.copy(sorted((root / "grow").glob("*.avi"))[0], locked / "x.avi")
    locked.chmod(0)
    try:
        r = _run(_unprivileged(_cli(root, tmp_path / "s", "--test-size", "0.5", "--workers", "1")))
    finally:
        locked.chmod(0o755)
    assert r.returncode == 0, r.stderr
    assert fmt.load_manifest(tmp_path / "s").skipped == [
        {"path": "grow/locked", "reason": "folder cannot be listed (Permission denied); its videos are not packed"}]


def test_the_decoder_hooks_are_inert_without_the_opt_in(videos, tmp_path, monkeypatch):
    culprit = sorted((videos / "grow").glob("*.avi"))[0].name
    monkeypatch.setenv(workers.TEST_CRASH_ON, culprit)  # set by accident, without PREPROCESS_FAULT_INJECTION=1
    monkeypatch.delenv(workers.FAULT_INJECTION, raising=False)
    manifest = json.loads((make_shards(videos, tmp_path / "s") / fmt.MANIFEST_NAME).read_text())
    assert not any("decoder crashed" in s["reason"] for s in manifest["skipped"])
