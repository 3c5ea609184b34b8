"""Object storage (``s3://``, ``gs://``, ``http(s)://``): ranged reads of a remote shard folder's files.

**Transport: fsspec**, with s3fs for S3 and every S3-compatible store (endpoint and keys come from the
standard AWS variables and files, as for the aws CLI: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/config``), gcsfs for GCS (Google's default
credentials) and aiohttp for HTTP. One interface over three transports, each kept by its own project;
all this module asks of them is a ranged read of one object (``cat_file(path, start, end)``) and its
size. Every request has a deadline (``timeout``) and is retried with exponential backoff (``retries``);
a missing object, refused access and missing credentials are not retried. What still fails is a
``RemoteError`` naming the URL, which the reader turns into a bad shard (an error, or a counted skip
under ``--on-bad-sample skip``). The files go through the node-local cache, ``dist_train.data.cache``.

**Secrets** (keys, tokens, signed URLs' query strings) never leave this module: ``public(where)`` is
the address without user, password or query, the one that configs, checkpoints, logs and messages
show; error text from the transport is scrubbed of every secret it could hold (``_scrub``).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from urllib.parse import parse_qsl, urlsplit

from dist_train.locations import (
    CREDENTIALS_HINT,
    PROTOCOLS,
    check_url,
    public,
)

log = logging.getLogger("dist_train")

class RemoteError(OSError):
    """A remote file cannot be fetched; the message names its URL (without secrets) and says why."""


class RemoteMissing(RemoteError, FileNotFoundError):
    """The remote file does not exist."""


_FS_LOCK = [threading.Lock()]  # one thread makes a process's filesystem; a forked child gets a fresh lock
os.register_at_fork(after_in_child=lambda: _FS_LOCK.__setitem__(0, threading.Lock()))


class Remote:
    """One remote folder: ranged reads of its files, each with a deadline and retried with backoff."""

    def __init__(self, where: str, timeout: float = 60.0, retries: int = 8):
        check_url(where)
        u = urlsplit(where)
        self.scheme, self.public = u.scheme, public(where).rstrip("/") + "/"
        self.timeout, self.retries = timeout, retries
        self._query, self._user, self._password = u.query, u.username, u.password
        self._secrets = [s for s in (u.query, u.password, *(v for _, v in parse_qsl(u.query)),
                                     os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN"))
                         if s and len(s) >= 4]
        self._fs: dict[int, object] = {}  # process id -> its filesystem

    def url(self, name: str) -> str:
        """The public URL of file ``name`` (for messages)."""
        return self.public + name

    def _path(self, name: str) -> str:
        """What fsspec is given for ``name``: ``bucket/prefix/name``, or the full URL with its query for HTTP."""
        if self.scheme in ("s3", "gs"):
            return self.public.split("://", 1)[1] + name
        return self.url(name) + (f"?{self._query}" if self._query else "")

    def _filesystem(self):
        """This process's fsspec filesystem, made on first use. A forked loader worker makes its own (its parent's
        event loop and connections do not cross a fork) and keeps a reference to its parent's, whose finalizer
        would otherwise close the parent's connections from the child."""
        pid = os.getpid()
        with _FS_LOCK[0]:
            if pid not in self._fs:
                self._fs[pid] = self._make_filesystem()
            return self._fs[pid]

    def _make_filesystem(self):
        import fsspec

        t = self.timeout
        if self.scheme == "s3":
            opts = {"config_kwargs": {"connect_timeout": t, "read_timeout": t, "retries": {"max_attempts": 1}}}
        elif self.scheme == "gs":
            opts = {}
        else:
            import aiohttp

            auth = aiohttp.BasicAuth(self._user, self._password or "") if self._user else None
            opts = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(sock_connect=t, sock_read=t),
                                      "auth": auth}}
        return fsspec.filesystem(PROTOCOLS[self.scheme], skip_instance_cache=True, **opts)

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def _call(self, name: str, what: str, fn):
        """``fn(filesystem, path)``, retried with backoff (0.5 s doubling to 30 s) on anything but a missing file,
        refused access, missing credentials or a bug."""
        for attempt in range(self.retries + 1):
            try:
                return fn(self._filesystem(), self._path(name))
            except FileNotFoundError:
                raise RemoteMissing(errno.ENOENT, f"{self.url(name)} does not exist") from None
            except PermissionError as e:
                raise RemoteError(errno.EACCES, f"{self.url(name)}: access denied ({self._scrub(str(e))}); check "
                                  f"the credentials ({CREDENTIALS_HINT[self.scheme]})") from None
            except (TypeError, AttributeError, NameError, ImportError):  # a bug, not the network
                raise
            except Exception as e:  # a timeout, a reset or refused connection, a server error: try again
                reason = self._scrub(f"{type(e).__name__}: {e}".rstrip(": "))
                if getattr(e, "status", None) in (401, 403):  # HTTP: refused
                    raise RemoteError(errno.EACCES, f"{self.url(name)}: access denied ({reason}); check the "
                                      f"credentials ({CREDENTIALS_HINT[self.scheme]})") from None
                if "Credentials" in type(e).__name__:  # botocore's and google.auth's: none found
                    raise RemoteError(errno.EACCES, f"{self.url(name)}: {reason}; set them "
                                      f"({CREDENTIALS_HINT[self.scheme]})") from None
                if attempt == self.retries:
                    raise RemoteError(errno.EIO, f"{self.url(name)}: {what} failed {attempt + 1} times, the last "
                                      f"with {reason}") from None
                log.warning("%s: %s failed (%s); retry %d of %d", self.url(name), what, reason, attempt + 1,
                            self.retries)
                time.sleep(min(30.0, 0.5 * 2 ** attempt))

    def read(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of file ``name``."""
        def get(fs, path):
            got = fs.cat_file(path, start=start, end=end, timeout=self.timeout)
            if len(got) != end - start:
                raise OSError(f"asked for bytes {start}-{end - 1}, got {len(got)} bytes")
            return got
        return self._call(name, f"reading bytes {start}-{end - 1}", get)

    def read_all(self, name: str) -> bytes:
        """All of file ``name`` (a small one: the manifest, an index)."""
        return self._call(name, "reading", lambda fs, path: fs.cat_file(path, timeout=self.timeout))

    def size(self, name: str) -> int:
        return int(self._call(name, "asking its size", lambda fs, path: fs.info(path, timeout=self.timeout)["size"]))
