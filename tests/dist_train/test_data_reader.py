"""The shard reader (dist_train.data.reader) and the format's validation (preprocess.shard_format) on real shards.

Every test works on a copy of the session's ``sample_shards`` (4 train shards of 4 samples, 2 test shards),
damaged in one specific way, and checks the reason the reader gives, for which sample, and that the
other samples still read.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds

from dist_train.data.reader import (
    LocalShards,
    SampleError,
    ShardIndexes,
    ShardReader,
    iter_unindexed,
    read_split,
    verify_shards,
)
from preprocess import shard_format as fmt
from preprocess.index import IndexingError, reindex
from preprocess.shard_format import FormatError, index_limit, load_manifest, parse_index

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def shards(sample_shards, tmp_path) -> Path:
    """A private copy of the sample shards (the session fixture stays untouched)."""
    out = tmp_path / "shards"
    shutil.copytree(sample_shards, out)
    return out


def reader_for(root: Path, split: str = "train") -> tuple[fmt.Manifest, ShardReader]:
    m = load_manifest(root)
    return m, ShardReader(LocalShards(root), m.shards[split], m.fields)


def outcome(reader: ShardReader, i: int, row: int) -> dict | str:
    """Sample ``row`` of shard ``i`` as bytes by field, or the SampleError's reason."""
    try:
        return {k: bytes(v) if isinstance(v, memoryview) else v for k, v in reader.sample(i, row).items()}
    except SampleError as e:
        return str(e)


def outcomes(reader: ShardReader, i: int) -> list[dict | str]:
    return [outcome(reader, i, row) for row in range(reader.shards[i].count)]


def originals(sample_shards: Path, split: str = "train") -> list[list[dict]]:
    """Every sample of the intact shards, by shard then row."""
    m, r = reader_for(sample_shards, split)
    try:
        return [outcomes(r, i) for i in range(len(m.shards[split]))]
    finally:
        r.close()


def edit_manifest(root: Path, change) -> None:
    raw = json.loads((root / fmt.MANIFEST_NAME).read_text())
    change(raw)
    (root / fmt.MANIFEST_NAME).write_text(json.dumps(raw))


def shard_entry(raw: dict, name: str) -> dict:
    split = name.split("-")[0]
    return next(s for s in raw["splits"][split]["shards"] if s["name"] == name)


def set_index(root: Path, shard: str, data: bytes, listed: bytes | None = None) -> None:
    """Replace the index file of ``shard``; the manifest lists the sha256 of ``listed`` (default: ``data``)."""
    (root / fmt.index_name(shard)).write_bytes(data)
    digest = hashlib.sha256(data if listed is None else listed).hexdigest()
    edit_manifest(root, lambda raw: shard_entry(raw, shard).update(index_sha256=digest))


def member_of(tar_path: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(tar_path) as tar:
        return tar.getmember(name)


def patch_header(blob: bytearray, header: int, start: int, value: bytes) -> None:
    """Overwrite bytes ``start..`` of the tar header at ``header`` and recompute its checksum (tarfile checks it)."""
    blob[header + start:header + start + len(value)] = value
    blob[header + 148:header + 156] = b" " * 8
    blob[header + 148:header + 155] = b"%06o\0" % sum(blob[header:header + fmt.TAR_BLOCK])


def timed(fn, *args):
    t0 = time.monotonic()
    try:
        return fn(*args), time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 - the caller looks at what was raised
        return e, time.monotonic() - t0


# ---------------------------------------------------------------------------------------------
# What the packer writes: plain tars, DALI's index, wids descriptions


def test_every_sample_is_what_plain_webdataset_reads(sample_shards):
    m = load_manifest(sample_shards)
    for split in fmt.SPLITS:
        reader = ShardReader(LocalShards(sample_shards), m.shards[split], m.fields)
        for i, info in enumerate(m.shards[split]):
            url = str(sample_shards / info.name)
            plain = list(wds.WebDataset(url, shardshuffle=False, nodesplitter=None))
            assert [s["__key__"] for s in plain] == list(info.keys)  # same samples, same order
            for row, ref in enumerate(plain):
                got = reader.sample(i, row)
                assert got["__key__"] == ref["__key__"]
                assert set(got) - {"__key__"} == set(m.fields) == set(ref) - {"__key__", "__url__", "__local_path__"}
                assert all(bytes(got[f]) == ref[f] for f in m.fields)
            # webdataset's own iterators (the reader's fallback) agree too
            assert [s["__key__"] for s in iter_unindexed(url)] == list(info.keys)
        reader.close()
    if shutil.which("tar"):
        info = m.shards["train"][0]
        listing = subprocess.run(["tar", "tf", str(sample_shards / info.name)], capture_output=True, text=True,
                                 check=True, timeout=30).stdout.split()
        assert listing == [f"{k}.{f}" for k in info.keys for f in m.fields]


def dali_reference_index(path: Path) -> bytes:
    """What DALI's wds2idx writes with its tarfile fallback: per sample (name up to the first dot), each
    regular member as ``<ext> <data offset> <size> <name>``; the offset is where tarfile leaves the file."""
    samples: list[tuple[str, list[str]]] = []
    with tarfile.open(path) as tar:
        for member in tar:
            if member.type != tarfile.REGTYPE:
                continue
            assert tar.fileobj.tell() == member.offset_data
            base, ext = member.name.split(".", 1)
            if not samples or samples[-1][0] != base:
                samples.append((base, []))
            samples[-1][1].append(f"{ext} {member.offset_data} {member.size} {member.name}")
    return (f"v1.2 {len(samples)}\n" + "".join(" ".join(parts) + "\n" for _, parts in samples)).encode("ascii")


def test_index_files_are_dalis_wds2idx_format(sample_shards):
    m = load_manifest(sample_shards)
    for split in fmt.SPLITS:
        for info in m.shards[split]:
            raw = (sample_shards / info.index).read_bytes()
            assert raw == dali_reference_index(sample_shards / info.name), info.name
            assert hashlib.sha256(raw).hexdigest() == info.index_sha256
            assert info.bytes == (sample_shards / info.name).stat().st_size
            index = parse_index(raw, info.index, info.keys, m.fields)
            with tarfile.open(sample_shards / info.name) as tar:
                for row, key in enumerate(info.keys):
                    for j, f in enumerate(m.fields):
                        member = tar.getmember(f"{key}.{f}")
                        assert (index.offsets[row, j], index.sizes[row, j]) == (member.offset_data, member.size)


def test_wids_descriptions_match_the_manifest(sample_shards):
    m = load_manifest(sample_shards)
    for split in fmt.SPLITS:
        desc = json.loads((sample_shards / fmt.wids_name(split)).read_text())
        assert desc == {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split,
                        "shardlist": [{"url": s.name, "nsamples": s.count, "filesize": s.bytes}
                                      for s in m.shards[split]]}
        assert [s["filesize"] for s in desc["shardlist"]] == [(sample_shards / s.name).stat().st_size
                                                             for s in m.shards[split]]
        assert sum(s["nsamples"] for s in desc["shardlist"]) == m.count(split)


def test_wids_reads_the_descriptions(sample_shards, tmp_path):
    wids = pytest.importorskip("wids")
    m = load_manifest(sample_shards)
    ref = originals(sample_shards)
    ds = wids.ShardListDataset(str(sample_shards / fmt.wids_name("train")), cache_dir=str(tmp_path / "wids"),
                               transformations=[])  # raw members (BytesIO), not decoded images
    assert len(ds) == m.count("train")
    keys = [k for s in m.shards["train"] for k in s.keys]
    flat = [s for shard in ref for s in shard]
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["__key__"] == keys[i]
        assert all(sample["." + f].getvalue() == flat[i][f] for f in m.fields)


# ---------------------------------------------------------------------------------------------
# Damaged tars


BAD_SIZES = {
    "negative": b"-0000002000\0",
    "huge": b"77777777777\0",
    "not octal": b"0000000009z\0",
}


def with_bad_size(root: Path, field: bytes, shard: str = "train-000000.tar", row: int = 1) -> tuple[str, int]:
    """Give member 005.jpg of sample ``row`` of ``shard`` the tar size field ``field``; its name and data offset."""
    key = load_manifest(root).shards["train"][int(shard[-10:-4])].keys[row]
    member = member_of(root / shard, f"{key}.005.jpg")
    blob = bytearray((root / shard).read_bytes())
    patch_header(blob, member.offset, 124, field)
    (root / shard).write_bytes(bytes(blob))
    return member.name, member.offset_data


@pytest.mark.parametrize("kind", list(BAD_SIZES))
def test_a_bad_size_field_fails_that_sample_only(sample_shards, shards, kind):
    name, offset = with_bad_size(shards, BAD_SIZES[kind])
    m, reader = reader_for(shards)
    got, seconds = timed(outcomes, reader, 0)
    assert seconds < 2
    size = member_of(sample_shards / "train-000000.tar", name).size
    assert got[1] == (f"member {name} at byte {offset} differs from the index: its tar header gives the size "
                      f"{BAD_SIZES[kind].decode()!r}, the index {size}; " + fmt.REINDEX_HINT.format(root=shards))
    ref = originals(sample_shards)[0]
    assert [got[r] for r in (0, 2, 3)] == [ref[r] for r in (0, 2, 3)]


@pytest.mark.parametrize("kind, reason", [
    ("negative", r"\(size -1024,|it is not a readable tar"),  # newer Pythons' tarfile may refuse it itself
    ("huge", rf"\(size {8**11 - 1},"),
    ("not octal", "does not hold exactly the members"),  # tarfile ends the archive at an invalid header
])
def test_reindex_refuses_a_bad_size_field(shards, kind, reason):
    with_bad_size(shards, BAD_SIZES[kind])
    # The manifest lists the damaged tar's sha256: what refuses it is the header, not the hash.
    digest = fmt.sha256_file(shards / "train-000000.tar")
    edit_manifest(shards, lambda raw: shard_entry(raw, "train-000000.tar").update(sha256=digest))
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    with pytest.raises(IndexingError) as e:
        reindex(shards)
    assert f"{shards / 'train-000000.tar'}: cannot be indexed: " in str(e.value) and re.search(reason, str(e.value))
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before  # nothing written


@pytest.mark.timeout(20)
def test_webdataset_fallback_raises_on_a_negative_size_instead_of_looping(tmp_path):
    """A size of -1024 points the next header back at this one: a seeking reader would read it forever."""
    blob = bytearray()
    for name in ("a.txt", "b.txt"):
        blob += fmt.tar_header(name, 100) + b"x" * 100 + bytes(412)
    blob += bytes(2 * fmt.TAR_BLOCK)  # end of archive: 3 KB in all
    path = tmp_path / "neg.tar"
    path.write_bytes(bytes(blob))
    assert [s["__key__"] for s in iter_unindexed(path)] == ["a", "b"]  # intact, it reads
    patch_header(blob, fmt.TAR_BLOCK * 2, 124, b"-0000002000\0")
    path.write_bytes(bytes(blob))
    t0 = time.monotonic()
    with pytest.raises(tarfile.TarError):  # here: "seeking backwards is not allowed" (stream mode)
        for _ in itertools.islice(iter_unindexed(path), 1000):
            pass
    assert time.monotonic() - t0 < 2


def test_a_negative_size_in_a_shard_without_index_fails_its_samples_with_the_reason(shards):
    """Without its index file a shard's index is inferred from the tar, with preprocess.index's checks: a
    member with a negative size makes the whole shard unusable (its index cannot be trusted), quickly."""
    name, _ = with_bad_size(shards, BAD_SIZES["negative"])
    (shards / "train-000000.idx").unlink()
    m, reader = reader_for(shards)
    with pytest.warns(UserWarning, match="no index file train-000000.idx, inferring the index from the tar"):
        got, seconds = timed(outcomes, reader, 0)
    assert seconds < 2 and all(isinstance(g, str) for g in got), got
    assert all("its index train-000000.idx is missing and cannot be inferred from the tar" in g for g in got)
    assert all("sha256" in g or "not a regular file" in g or "not a readable tar" in g for g in got), got


def test_members_past_the_end_of_a_truncated_shard(sample_shards, shards):
    m = load_manifest(shards)
    info = m.shards["train"][0]
    cut = member_of(shards / info.name, f"{info.keys[2]}.004.jpg").offset_data + 100  # inside sample 2
    (shards / info.name).write_bytes((shards / info.name).read_bytes()[:cut])
    _, reader = reader_for(shards)
    got = outcomes(reader, 0)
    assert got[:2] == originals(sample_shards)[0][:2]
    for reason in got[2:]:
        assert isinstance(reason, str) and f"past the end of the shard ({cut} bytes): truncated?" in reason
    with pytest.raises(SampleError, match=rf"sample '{info.keys[2]}' of shard {info.name}: .*past the end"):
        list(read_split(m, "train"))
    kept = list(read_split(m, "train", skip_bad=True))
    assert len(kept) == m.count("train") - 2 and {s["__key__"] for s in kept}.isdisjoint(info.keys[2:])
    first = [s["__shard__"] for s in read_split(m, "train", limit=3, skip_bad=True)]
    assert first == [info.name] * 2 + ["train-000001.tar"]


def test_a_member_name_that_differs_from_the_index_fails_that_sample_only(sample_shards, shards):
    m = load_manifest(shards)
    info = m.shards["train"][2]
    member = member_of(shards / info.name, f"{info.keys[2]}.007.jpg")
    blob = bytearray((shards / info.name).read_bytes())
    patch_header(blob, member.offset, len(member.name) - 3, b"J")  # 007.jpg -> 007.Jpg, same size
    (shards / info.name).write_bytes(bytes(blob))
    with tarfile.open(shards / info.name) as tar:  # still a valid tar
        assert f"{info.keys[2]}.007.Jpg" in tar.getnames()
    _, reader = reader_for(shards)
    got = outcomes(reader, 2)
    assert got[2] == (f"member {member.name} at byte {member.offset_data} differs from the index: its tar header "
                      f"names '{info.keys[2]}.007.Jpg'; " + fmt.REINDEX_HINT.format(root=shards))
    ref = originals(sample_shards)[2]
    assert [got[r] for r in (0, 1, 3)] == [ref[r] for r in (0, 1, 3)]


def test_a_missing_shard_cannot_be_opened(sample_shards, shards):
    (shards / "train-000002.tar").unlink()
    (shards / "train-000003.tar").unlink()
    (shards / "train-000003.idx").unlink()  # no index either: it cannot be inferred from a tar that is not there
    _, reader = reader_for(shards)
    assert outcomes(reader, 2) == ["cannot be opened (No such file or directory)"] * 4
    with pytest.warns(UserWarning, match="no index file train-000003.idx"):
        got = outcomes(reader, 3)
    assert all("its index train-000003.idx is missing and cannot be inferred from the tar" in g
               and "No such file or directory" in g for g in got)
    assert outcomes(reader, 1) == originals(sample_shards)[1]


def test_a_missing_index_is_inferred_from_the_tar_with_a_warning(sample_shards, shards):
    (shards / "train-000001.idx").unlink()
    _, reader = reader_for(shards)
    with pytest.warns(UserWarning, match=r"no index file train-000001\.idx, "
                                         r"inferring the index from the tar.*preprocess.index"):
        got = outcomes(reader, 1)
    assert got == originals(sample_shards)[1]


def test_verify_shards_names_changed_files_only(sample_shards, shards):
    m = load_manifest(shards)
    assert verify_shards(m) == {}
    path = shards / "train-000003.tar"
    blob = bytearray(path.read_bytes())
    blob[5000] ^= 0xFF  # same size
    path.write_bytes(bytes(blob))
    idx = shards / "test-000001.idx"
    idx.write_bytes(idx.read_bytes().replace(b"v1.2", b"v1.3"))
    bad = verify_shards(m)
    assert set(bad) == {"train-000003.tar", "test-000001.tar"}
    assert bad["train-000003.tar"].startswith("train-000003.tar is not the file manifest.json lists (sha256")
    assert bad["test-000001.tar"].startswith("test-000001.idx is not the file manifest.json lists (sha256")
    assert set(verify_shards(m, ["train"])) == {"train-000003.tar"}


# ---------------------------------------------------------------------------------------------
# Damaged or hostile indexes


def index_lines(root: Path, shard: str) -> list[list[str]]:
    return [line.split(" ") for line in (root / fmt.index_name(shard)).read_text().splitlines()]


def join_lines(lines: list[list[str]]) -> bytes:
    return ("\n".join(" ".join(t) for t in lines) + "\n").encode()


def test_an_index_that_is_not_the_manifests_fails_every_sample_of_its_shard(sample_shards, shards):
    lines = index_lines(shards, "train-000001.tar")
    lines[1][1] = str(int(lines[1][1]) + 512)
    (shards / "train-000001.idx").write_bytes(join_lines(lines))  # manifest.json still lists the old sha256
    _, reader = reader_for(shards)
    assert outcomes(reader, 1) == [f"its index train-000001.idx is not the one manifest.json lists (sha256 "
                                   f"differs): run `python -m preprocess.index {shards}` to rebuild the index files, "
                                   "or re-pack the videos"] * 4
    ref = originals(sample_shards)
    assert [outcomes(reader, i) for i in (0, 2, 3)] == [ref[i] for i in (0, 2, 3)]


def test_overlapping_members_are_refused(sample_shards, shards):
    m = load_manifest(shards)
    info = m.shards["train"][0]
    lines = index_lines(shards, info.name)
    lines[2][1] = lines[1][5]  # sample 1's first frame where sample 0's second one is
    data = join_lines(lines)
    with pytest.raises(FormatError, match="members overlap"):
        parse_index(data, "x.idx", info.keys, m.fields)
    set_index(shards, info.name, data)
    _, reader = reader_for(shards)
    got = outcomes(reader, 0)
    assert got == [f"{shards / info.index}: members overlap (two members claim the same bytes of the tar)"] * 4
    assert outcomes(reader, 1) == originals(sample_shards)[1]


@pytest.mark.parametrize("shape", ["one long line", "many lines"])
def test_an_index_of_a_million_members_is_refused_unparsed(shards, shape):
    m = load_manifest(shards)
    info = m.shards["train"][0]
    n = 1_000_000
    if shape == "one long line":
        data = f"v1.2 {info.count}\n".encode() + b"000.jpg 512 0 00000019.000.jpg " * n
    else:
        data = f"v1.2 {n}\n".encode() + b"000.jpg 512 0 k.000.jpg\n" * n
    limit = index_limit(info.keys, m.fields)
    error, seconds = timed(parse_index, data, "big.idx", info.keys, m.fields)
    assert isinstance(error, FormatError) and seconds < 1
    assert str(error) == f"big.idx: {len(data)} bytes, more than an index of {info.count} samples can take"
    # The reader reads at most limit + 1 bytes: with the manifest listing the sha256 of those bytes, the
    # reason says how many it read; with the sha256 of the whole file, it is refused as not the manifest's.
    set_index(shards, info.name, data, listed=data[:limit + 1])
    _, reader = reader_for(shards)
    reason, seconds = timed(outcome, reader, 0, 0)
    assert seconds < 1
    assert reason == f"{shards / info.index}: {limit + 1} bytes, more than an index of 4 samples can take"
    set_index(shards, info.name, data)
    _, reader = reader_for(shards)
    reason, seconds = timed(outcome, reader, 0, 0)
    assert seconds < 1 and "is not the one manifest.json lists (sha256 differs)" in reason


def bad_index_cases():
    big = str(fmt.MAX_MEMBER_BYTES + 1)
    quarter = str(fmt.MAX_SAMPLE_BYTES // 16)  # 4 MiB each: 18 of them are more than a sample may take
    plain = "offsets and sizes must be plain integers"
    member = "line 2: member 00000000.000.jpg at byte"
    return {
        "negative offset": (lambda t: t.__setitem__(1, "-512"), plain),
        "negative size": (lambda t: t.__setitem__(2, "-1"), plain),
        "float offset": (lambda t: t.__setitem__(1, "512.0"), plain),
        "hex size": (lambda t: t.__setitem__(2, "0x10"), plain),
        "empty size": (lambda t: t.__setitem__(2, ""), plain),
        "16 digits": (lambda t: t.__setitem__(1, "1" + "0" * 15), "(at most 15 digits)"),
        "unaligned offset": (lambda t: t.__setitem__(1, "513"), f"{member} 513 ("),
        "offset inside the first header": (lambda t: t.__setitem__(1, "0"), f"{member} 0 ("),
        "member too large": (lambda t: t.__setitem__(2, big), f"({big} bytes) is not a member of a tar of this format"),
        "sample too large": (lambda t: t.__setitem__(slice(2, None, 4), [quarter] * (len(t) // 4)),
                             f"line 2: sample '00000000' claims {18 * int(quarter)} bytes, more than 64 MiB"),
        "wrong member name": (lambda t: t.__setitem__(3, "00000001.000.jpg"), "line 2: does not list exactly"),
        "missing member": (lambda t: t.__delitem__(slice(0, 4)), "line 2: does not list exactly the 18 members"),
        "duplicate member": (lambda t: t.__setitem__(slice(4, 8), t[0:4]), "line 2: does not list exactly"),
    }


@pytest.mark.parametrize("case", list(bad_index_cases()))
def test_bad_offsets_and_sizes_are_refused(case):
    fields = fmt.sample_fields(16)
    keys = ("00000000", "00000001")
    samples, at = [], 0
    for key in keys:
        members = []
        for f in fields:
            members.append((f, at + 512, 100))
            at += 1024
        samples.append((key, members))
    good = fmt.format_index(samples)
    parsed = parse_index(good, "t.idx", keys, fields)
    assert parsed.offsets[1, 0] == 18 * 1024 + 512 and (parsed.sizes == 100).all()
    change, reason = bad_index_cases()[case]
    lines = [line.split(" ") for line in good.decode().splitlines()]
    change(lines[1])
    error, seconds = timed(parse_index, join_lines(lines), "t.idx", keys, fields)
    assert isinstance(error, FormatError) and seconds < 1
    assert str(error).startswith("t.idx") and reason in str(error), str(error)


def test_members_may_be_listed_in_any_order():
    """DALI lists members as the tar holds them; the reader still gets them in field order."""
    fields = fmt.sample_fields(2)
    members = [(f, 512 + 1024 * j, 10 + j) for j, f in enumerate(fields)]
    shuffled = fmt.format_index([("k", members[::-1])])
    parsed = parse_index(shuffled, "t.idx", ["k"], fields)
    assert parsed.offsets.tolist() == [[512, 1536, 2560, 3584]] and parsed.sizes.tolist() == [[10, 11, 12, 13]]


def test_indexes_are_read_once_and_shared(sample_shards, shards):
    """ShardIndexes gives each shard's index or the reason it cannot be used (a missing one inferred from the
    tar), read once; readers given them (the loader workers) use those and do not read the index files again."""
    m = load_manifest(shards)
    (shards / "train-000001.idx").unlink()
    (shards / "train-000002.idx").write_bytes(b"v1.2 4\n")
    with pytest.warns(UserWarning, match="inferring the index"):
        indexes = ShardIndexes(LocalShards(shards), m.shards["train"], m.fields, m.num_classes).load_all()
    got = [indexes.get(i) for i in range(4)]
    assert isinstance(got[0], fmt.ShardIndex) and isinstance(got[1], fmt.ShardIndex) and "sha256 differs" in got[2]
    original = parse_index((sample_shards / "train-000001.idx").read_bytes(), "x", m.shards["train"][1].keys, m.fields)
    assert (got[1].offsets == original.offsets).all() and (got[1].sizes == original.sizes).all()
    assert got[0].offsets.shape == got[0].sizes.shape == (4, len(m.fields))
    for i in (0, 3):
        (shards / m.shards["train"][i].index).unlink()  # loaded before: not needed any more
    assert [indexes.get(i) for i in range(4)] == got
    reader = ShardReader(LocalShards(shards), m.shards["train"], m.fields, indexes=indexes)
    ref = originals(sample_shards)
    assert outcomes(reader, 0) == ref[0] and outcomes(reader, 3) == ref[3]
    assert all("sha256 differs" in r for r in outcomes(reader, 2))
    bad = ShardReader(LocalShards(shards), m.shards["train"], m.fields, indexes=indexes,
                      bad_shards={"train-000003.tar": "found bad by --verify-shards"})
    assert outcomes(bad, 3) == ["found bad by --verify-shards"] * 4


# ---------------------------------------------------------------------------------------------
# Manifest validation


def _first(raw, split="train"):
    return raw["splits"][split]["shards"][0]


def _set(key, value, split="train", i=0):
    return lambda raw: raw["splits"][split]["shards"][i].__setitem__(key, value)


def _test_shard_under_train(raw):
    raw["splits"]["train"]["shards"].append(raw["splits"]["test"]["shards"].pop(0))
    raw["splits"]["train"]["count"] += 4
    raw["splits"]["test"]["count"] -= 4


def _duplicate_key(raw):
    shards = raw["splits"]["train"]["shards"]
    shards[1]["keys"][0] = shards[0]["keys"][0]


def _key_in_both_splits(raw):  # a clip in train and test would leak into the test score
    raw["splits"]["test"]["shards"][0]["keys"][0] = raw["splits"]["train"]["shards"][0]["keys"][0]


SHARD0 = "splits.train.shards[0]"
MANIFEST_CASES = {
    "parent folder": (_set("name", "../x.tar"), f"{SHARD0}.name must be a plain file name"),
    "sub folder": (_set("name", "sub/train-000000.tar"), f"{SHARD0}.name must be a plain file name"),
    "absolute": (_set("name", "/tmp/train-000000.tar"), f"{SHARD0}.name must be a plain file name"),
    "test shard in train": (_test_shard_under_train, "splits.train.shards[4].name must be a plain file name like"),
    "negative count": (_set("count", -4), f"{SHARD0}.count must be a non-negative integer, got -4"),
    "bool count": (_set("count", True), f"{SHARD0}.count must be a non-negative integer, got True"),
    "float count": (_set("count", 4.0), f"{SHARD0}.count must be a non-negative integer, got 4.0"),
    "string bytes": (_set("bytes", "215040"), f"{SHARD0}.bytes must be a non-negative integer"),
    "short keys": (lambda raw: _first(raw)["keys"].pop(), f"{SHARD0}: keys, labels and groups must be lists of"),
    "key with a dot": (lambda raw: _first(raw)["keys"].__setitem__(0, "0000.019"), f"{SHARD0}.keys: every key"),
    "key with a slash": (lambda raw: _first(raw)["keys"].__setitem__(0, "../0019"), f"{SHARD0}.keys: every key"),
    "label out of range": (lambda raw: _first(raw)["labels"].__setitem__(0, 2),
                           f"{SHARD0}.labels: every label must be an integer in 0..1"),
    "negative label": (lambda raw: _first(raw)["labels"].__setitem__(0, -1), f"{SHARD0}.labels"),
    "duplicate key": (_duplicate_key, "splits.train lists a shard or a sample key twice"),
    "key in both splits": (_key_in_both_splits, "is in both train and test"),
    "split count": (lambda raw: raw["splits"]["train"].__setitem__("count", 17),
                    "splits.train.count is 17, its shards hold 16"),
    "float split count": (lambda raw: raw["splits"]["train"].__setitem__("count", 16.0),
                          "splits.train.count is 16.0, its shards hold 16"),
    "name with a newline": (_set("name", "train-000000.tar\n"), f"{SHARD0}.name must be a plain file name"),
    "key with a newline": (lambda raw: _first(raw)["keys"].__setitem__(0, "00000019\n"), f"{SHARD0}.keys: every key"),
    "upper-case sha256": (lambda raw: _first(raw).__setitem__("sha256", _first(raw)["sha256"].upper()),
                          f"{SHARD0}.sha256 must be 64 lowercase hex digits"),
    "short index sha256": (_set("index_sha256", "abc"), f"{SHARD0}.index_sha256 must be 64 lowercase hex digits"),
    "other index": (_set("index", "train-000001.idx"), f"{SHARD0}.index must be 'train-000000.idx'"),
    "unknown split": (lambda raw: raw["splits"].__setitem__("val", raw["splits"]["test"]),
                      "splits must be an object with keys among"),
    "args not an object": (lambda raw: raw.__setitem__("args", 5), "args must be an object"),
    "skipped not a list": (lambda raw: raw.__setitem__("skipped", 5), "skipped must be a list"),
    "version 3": (lambda raw: raw.__setitem__("format_version", 3), "format version 3, this code reads version 2"),
    "version 1": (lambda raw: raw.__setitem__("format_version", 1), "run `python -m preprocess.index"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_validation_names_the_field(sample_shards, tmp_path, case):
    change, reason = MANIFEST_CASES[case]
    shutil.copy(sample_shards / fmt.MANIFEST_NAME, tmp_path / fmt.MANIFEST_NAME)
    load_manifest(tmp_path)  # intact: reads
    edit_manifest(tmp_path, change)
    with pytest.raises(FormatError) as e:
        load_manifest(tmp_path)
    assert str(e.value).startswith(str(tmp_path / fmt.MANIFEST_NAME)) and reason in str(e.value), str(e.value)


def test_a_fifo_in_place_of_a_shard_or_an_index_fails_at_once(sample_shards, shards):
    """A FIFO (or a device) where a file should be would block an open or never end a read."""
    os.unlink(shards / "train-000001.tar")
    os.mkfifo(shards / "train-000001.tar")
    os.unlink(shards / "train-000002.idx")
    os.mkfifo(shards / "train-000002.idx")
    m, reader = reader_for(shards)
    got, seconds = timed(lambda: [outcomes(reader, 1), outcomes(reader, 2)])
    assert seconds < 2
    assert got[0] == ["cannot be opened (not a regular file)"] * 4
    assert all("its index train-000002.idx cannot be read" in g for g in got[1])
    assert outcomes(reader, 0) == originals(sample_shards)[0]
    bad, seconds = timed(verify_shards, m)
    assert seconds < 2 and set(bad) == {"train-000001.tar", "train-000002.tar"}


def test_verify_shards_in_parts_covers_every_shard_once(shards):
    m = load_manifest(shards)
    blob = bytearray((shards / "test-000001.tar").read_bytes())
    blob[-1] ^= 1
    (shards / "test-000001.tar").write_bytes(bytes(blob))
    parts = [verify_shards(m, part=(k, 3)) for k in range(3)]
    assert [sorted(p) for p in parts].count(["test-000001.tar"]) == 1 and sum(map(len, parts)) == 1


def test_an_index_of_long_keys_fits_its_limit(tmp_path):
    key = "k" * 64  # the longest key the format allows, at offsets of many digits
    w = fmt.ShardWriter(tmp_path / "train-000000.tar")
    w.write(key, [b"\xff\xd8" * 10] * 16, 0, {"path": "a/b.avi"})
    info = w.close()
    raw = (tmp_path / "train-000000.idx").read_bytes()
    big = raw.replace(b" 512 ", b" " + b"9" * 14 + b"2 ")  # a 15-digit offset: still within the limit
    assert len(big) <= index_limit([key], fmt.sample_fields(16)) and info["keys"] == [key]
    assert parse_index(raw, "x", [key], fmt.sample_fields(16)).offsets[0, 0] == 512
