"""Train/test assignment of videos: stratified, group-aware, or HMDB51's official split files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

SPLIT_MODES = ("stratified", "group", "official")


class SplitError(ValueError):
    """The split cannot be made as asked; the message says what to change."""


def source_of(rel_path: str, class_name: str) -> str:
    """The source film of an HMDB51-style clip name: the part before ``_<class>_``.

    ``April_09_brush_hair_u_nm_np1_ba_goo_0.avi`` -> ``April_09``. Names without the class
    fall back to the name minus a trailing ``_<number>``.
    """
    stem = Path(rel_path).stem
    marker = f"_{class_name}_"
    if marker in stem:
        return stem[: stem.index(marker)]
    return re.sub(r"_\d+$", "", stem)


def stratified(labels: list[int], test_size: float, seed: int) -> list[str]:
    """The seed's StratifiedShuffleSplit: class proportions kept in both sides."""
    from sklearn.model_selection import StratifiedShuffleSplit

    counts = np.bincount(labels)
    if counts[counts > 0].min() < 2:
        raise SplitError(
            "stratified split needs at least 2 videos in every class "
            f"(smallest class has {counts[counts > 0].min()}); add videos or use --split group"
        )
    sss = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    try:
        train_idx, _ = next(sss.split(np.zeros(len(labels)), labels))
    except ValueError as e:
        raise SplitError(f"stratified split failed: {e}; change --test-size") from e
    return _assign(len(labels), train_idx)


def grouped(labels: list[int], groups: list[str], test_size: float, seed: int) -> list[str]:
    """Group-aware split: all clips of one source film land on the same side."""
    from sklearn.model_selection import GroupShuffleSplit

    if len(set(groups)) < 2:
        raise SplitError("group split needs at least 2 distinct source films; use --split stratified")
    gss = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    train_idx, _ = next(gss.split(np.zeros(len(labels)), labels, groups))
    return _assign(len(labels), train_idx)


def _assign(n: int, train_idx) -> list[str]:
    out = ["test"] * n
    for i in train_idx:
        out[i] = "train"
    return out


def read_official(split_dir: Path, split_number: int, classes: list[str]) -> dict[tuple[str, str], int]:
    """Parse HMDB51's ``testTrainMulti_7030_splits``: ``{(class, file name): 0|1|2}``.

    Files are ``<class>_test_split<k>.txt`` with lines ``<file name> <id>``; 1 = train,
    2 = test, 0 = unused.
    """
    split_dir = Path(split_dir)
    if split_number not in (1, 2, 3):
        raise SplitError(f"--split-number must be 1, 2 or 3, got {split_number}")
    if not split_dir.is_dir():
        raise SplitError(f"official split folder {split_dir} not found (expected testTrainMulti_7030_splits/)")
    table: dict[tuple[str, str], int] = {}
    for cls in classes:
        f = split_dir / f"{cls}_test_split{split_number}.txt"
        if not f.is_file():
            raise SplitError(f"{f} not found: the official split has no file for class {cls!r}")
        for lineno, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise SplitError(f"{f}:{lineno}: expected '<video file> <0|1|2>', got {line!r}")
            table[(cls, parts[0])] = int(parts[1])
    return table


def official(rel_paths: list[str], class_names: list[str], table: dict[tuple[str, str], int]) -> list[str | None]:
    """Side of each video under an official split; ``None`` for videos it leaves unused or unlisted."""
    out: list[str | None] = []
    for rel, cls in zip(rel_paths, class_names):
        code = table.get((cls, Path(rel).name))
        out.append({1: "train", 2: "test"}.get(code))
    return out
