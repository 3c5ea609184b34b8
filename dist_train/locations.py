"""Where shards are, in words that need no torch (``dist_train.config`` checks flags with them).

``--shards`` is a local folder or the URL of one (``s3://``, ``gs://``, ``http(s)://``): ``check_url``
refuses a URL that cannot work, ``public`` is how a URL may be shown and saved, ``parse_size`` reads
``--cache-size``, ``default_cache_dir`` is the node-local cache's default folder and
``add_cache_flags`` gives a tool the cache's flags. Reading remote shards is ``dist_train.data.cache``.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

PROTOCOLS = {"s3": "s3", "gs": "gcs", "http": "http", "https": "https"}  # URL scheme -> fsspec protocol
CREDENTIALS_HINT = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials; AWS_ENDPOINT_URL for a "
          "store other than AWS",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS, or gcloud auth application-default login",
    "http": "a user:password@ in the URL or a token in its query string",
    "https": "a user:password@ in the URL or a token in its query string",
}
CACHE_SIZE_HELP = ("most bytes this node's cache of remote shards may hold, e.g. 500M or 20G (K/M/G/T: powers of "
                   "1024); auto: the whole shard set, or 80%% of the free space on the cache's disk if that is less")
CACHE_DIR_HELP = ("folder of the node-local cache of remote shards (each node keeps its own, in a subfolder named "
                  "after the host); default: $SLURM_TMPDIR or $TMPDIR in a SLURM job, else ~/.cache/vidshard/shards")


def is_remote(where: str | os.PathLike) -> bool:
    """Whether ``--shards`` names a remote folder (``s3://``, ``gs://``, ``http://``, ``https://``)."""
    return isinstance(where, str) and urlsplit(where).scheme in PROTOCOLS


def public(where: str | os.PathLike) -> str:
    """``where`` as it may be shown and saved: a URL without user, password and query string (tokens,
    signatures); a local path as it is."""
    if not is_remote(where):
        return str(where)
    u = urlsplit(str(where))
    netloc = (u.hostname or "") + (f":{u.port}" if u.port else "")
    return urlunsplit((u.scheme, netloc, u.path, "", ""))


def check_url(where: str | os.PathLike) -> None:
    """ValueError if ``where`` is a URL this code cannot use: no bucket or host, or keys in an s3:// or gs:// URL
    (where logs would show them; those take keys from the environment)."""
    if not is_remote(where):
        return
    u = urlsplit(str(where))
    if u.scheme in ("s3", "gs") and (u.username or u.password or u.query):
        raise ValueError(f"{public(where)}: keys do not go in an {u.scheme}:// URL, where logs would show them; set "
                         f"them the standard way: {CREDENTIALS_HINT[u.scheme]}")
    if not u.hostname:
        raise ValueError(f"{public(where)}: no {'bucket' if u.scheme in ('s3', 'gs') else 'host'} in the URL")


def default_cache_dir(environ=os.environ) -> Path:
    """Node-local storage under SLURM (``$SLURM_TMPDIR``, ``$TMPDIR``, ``/tmp``), else the user's cache folder."""
    user = re.sub(r"[^A-Za-z0-9_.-]", "_", environ.get("USER") or str(os.getuid()))
    if environ.get("SLURM_JOB_ID"):
        return Path(environ.get("SLURM_TMPDIR") or environ.get("TMPDIR") or "/tmp") / f"vidshard-cache-{user}"
    return Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vidshard" / "shards"


def parse_size(text: str) -> int | None:
    """``--cache-size``: bytes, with an optional K/M/G/T suffix (powers of 1024); ``auto`` is None."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    if t == "AUTO":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)", t)
    if not m or float(m[1]) <= 0:
        raise ValueError(f"--cache-size must be auto or a size in bytes such as 500M or 20G, got {text!r}")
    return int(float(m[1]) * 1024 ** " KMGT".index(m[2] or " "))


def add_cache_flags(p: argparse.ArgumentParser) -> None:
    """``--cache-dir`` and ``--cache-size`` of the tools that read shards (the trainer has them as config fields)."""
    p.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)
    p.add_argument("--cache-size", default="auto", type=_size_flag, help=CACHE_SIZE_HELP)


def _size_flag(text: str) -> str:
    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text
