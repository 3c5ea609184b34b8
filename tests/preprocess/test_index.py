"""``python -m preprocess.index``: index files for format-1 shard folders, byte for byte what the packer writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from preprocess import shard_format as fmt
from preprocess.index import IndexingError, reindex
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(180)

V2_ONLY = ("bytes", "index", "index_sha256", "keys", "labels", "groups")


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def edit_manifest(root: Path, change) -> None:
    raw = json.loads((root / fmt.MANIFEST_NAME).read_text())
    change(raw)
    fmt.write_json_atomic(root / fmt.MANIFEST_NAME, raw)


def make_v1(root: Path) -> None:
    """Turn a packed folder into what format 1 wrote: no index files, no wids descriptions, shards by name,
    count and sha256 only."""
    def downgrade(raw):
        raw["format_version"] = 1
        for info in raw["splits"].values():
            for entry in info["shards"]:
                for k in V2_ONLY:
                    del entry[k]
    edit_manifest(root, downgrade)
    for p in [*root.glob("*.idx"), *root.glob("wids-*.json")]:
        p.unlink()


@pytest.fixture
def v1(sample_shards, tmp_path) -> Path:
    out = tmp_path / "v1"
    shutil.copytree(sample_shards, out)
    make_v1(out)
    return out


def run_index(root: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "preprocess.index", str(root)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_format_1_is_refused_with_the_way_out(v1):
    with pytest.raises(fmt.FormatError, match=rf"format version 1, .*`python -m preprocess\.index {v1}` to add"):
        fmt.load_manifest(v1)


def test_indexing_a_format_1_folder_gives_what_the_packer_writes(sample_shards, v1):
    assert not list(v1.glob("*.idx")) and set(files(v1)) < set(files(sample_shards))
    proc = run_index(v1)
    assert proc.returncode == 0, proc.stderr
    assert "indexed 6 shards" in proc.stderr and "format version 2" in proc.stderr
    got, want = files(v1), files(sample_shards)
    assert sorted(got) == sorted(want)  # every .idx and wids-*.json back, no temp files left
    assert [name for name in want if got[name] != want[name]] == []  # tars untouched, the rest byte-identical
    assert fmt.load_manifest(v1).count("train") == 16


def test_lost_or_damaged_index_files_of_a_format_2_folder_are_rebuilt(sample_shards, tmp_path):
    out = tmp_path / "v2"
    shutil.copytree(sample_shards, out)
    (out / "train-000001.idx").unlink()
    (out / "test-000000.idx").write_bytes(b"v1.2 4\n")
    (out / "wids-test.json").unlink()
    reindex(out)
    assert files(out) == files(sample_shards)


def refused(root: Path, *needles: str) -> None:
    """``python -m preprocess.index root`` exits 1 naming the problem and writes nothing."""
    before = files(root)
    proc = run_index(root)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("error: ") and all(n in proc.stderr for n in needles), proc.stderr
    assert files(root) == before  # no .idx, no wids descriptions, manifest.json unchanged
    assert not list(root.glob("*.idx")) and not list(root.glob("*.tmp"))


def test_a_tar_changed_after_packing_is_refused_and_nothing_is_written(v1):
    path = v1 / "test-000001.tar"
    blob = bytearray(path.read_bytes())
    blob[3000] ^= 0xFF  # inside a JPEG: the tar itself is still fine
    path.write_bytes(bytes(blob))
    refused(v1, f"{path}: cannot be indexed: its sha256 is not the one manifest.json lists")


@pytest.mark.parametrize("count, reason", [(5, "it holds 4 samples, manifest.json says 5"),
                                           (3, "it holds more members than its 3 samples can have (54)")])
def test_a_shard_with_the_wrong_number_of_samples_is_refused(v1, count, reason):
    edit_manifest(v1, lambda raw: raw["splits"]["train"]["shards"][2].__setitem__("count", count))
    refused(v1, f"{v1 / 'train-000002.tar'}: cannot be indexed: {reason}")


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_shard_name_outside_the_folder_is_never_opened(v1, tmp_path, where):
    """``../evil.tar`` is a FIFO: opening it would block, so a hang here means the name was used."""
    os.mkfifo(tmp_path / "evil.tar")

    def point_outside(raw):
        shards = raw["splits"]["test" if where == "first" else "train"]["shards"]  # test is indexed first
        shards[0 if where == "first" else -1]["name"] = "../evil.tar"
    edit_manifest(v1, point_outside)
    refused(v1, "'../evil.tar' is not a shard name of split")


@pytest.mark.parametrize("name", ["sub/train-000000.tar", "/tmp/train-000000.tar", "test-000000.tar", 7])
def test_other_names_that_are_not_shards_of_their_split_are_refused(v1, name):
    edit_manifest(v1, lambda raw: raw["splits"]["train"]["shards"][0].__setitem__("name", name))
    refused(v1, f"{name!r} is not a shard name of split 'train'")


def test_a_tar_of_many_tiny_members_is_refused_early(tmp_path):
    """20,000 empty members in a shard that says it holds 1 sample: refused at member 19, not read to the end."""
    root = tmp_path / "tiny"
    root.mkdir()
    header = fmt.tar_header("00000000.000.jpg", 0)
    blob = header * 20_000 + bytes(2 * fmt.TAR_BLOCK)
    (root / "train-000000.tar").write_bytes(blob)
    fmt.write_json_atomic(root / fmt.MANIFEST_NAME, {
        "format_version": 1, "classes": ["a", "b"], "n_frames": 16,
        "splits": {"train": {"count": 1, "shards": [{"name": "train-000000.tar", "count": 1,
                                                    "sha256": fmt.sha256_file(root / "train-000000.tar")}]}}})
    before = files(root)
    t0 = time.monotonic()
    with pytest.raises(IndexingError, match=r"train-000000\.tar: cannot be indexed: it holds more members than its "
                                            r"1 samples can have \(18\)"):
        reindex(root)
    assert time.monotonic() - t0 < 2
    assert files(root) == before


def test_a_tar_larger_than_its_samples_can_be_is_refused_unread(v1):
    path = v1 / "train-000001.tar"
    manifest = (v1 / fmt.MANIFEST_NAME).read_bytes()
    os.truncate(path, 1 << 40)  # sparse: a terabyte that a 4-sample shard cannot hold
    start = time.monotonic()
    with pytest.raises(IndexingError, match=rf"cannot be indexed: it is {1 << 40} bytes, more than its 4 samples"):
        reindex(v1)
    assert time.monotonic() - start < 5 and not list(v1.glob("*.idx"))
    assert (v1 / fmt.MANIFEST_NAME).read_bytes() == manifest


def test_a_manifest_that_would_not_read_back_is_refused_before_anything_is_written(v1):
    """The upgraded manifest is validated before a file is written (here: a class listed twice, which the shards
    themselves do not show)."""
    edit_manifest(v1, lambda raw: raw.__setitem__("classes", [raw["classes"][0]] * 2))
    refused(v1, "classes must be a list of distinct class names", "nothing was written")


def test_an_absurd_frame_count_is_refused(v1):
    edit_manifest(v1, lambda raw: raw.__setitem__("n_frames", 10**9))
    refused(v1, "is not a manifest of this format")
