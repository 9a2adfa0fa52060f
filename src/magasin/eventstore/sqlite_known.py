"""What the SQLite writer of this process wrote last, trusted while no other connection
commits: each stream's version, each document's body.

A handler loading an aggregate its own process just saved, or reading a document its own
process just wrote, need not ask the database — as long as nobody else wrote since. The
SQLite adapter has one writer per process, but another process (a CLI, a second store on
the same file) may write too; a time-based guess would let a load miss what it wrote. The
WAL-index header (the `-shm` file every connection to the database maps, format documented
at https://www.sqlite.org/walformat.html) holds `iChange`, a counter every commit, by any
connection, increments: reading it costs a memory read (the header is mapped here too), no
statement. The writer notes the counter around each of its transactions: when it moved by
exactly the number of commits it made, nobody else committed, and what it wrote is the
current state; any other move means another connection committed, and everything known is
forgotten (the next loads and reads query the database, as they always did). A reader
trusts what is known only while the header still stands exactly where the writer left it:
the counter and the rest of it (frame count, checksums of the last frame, salts), since
the counter alone can come back there — a connection that rebuilds the index (after a
writer died halfway through writing the header) restarts it from 0, and other commits may
then bring it back to where this writer left it, not the WAL's content.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from pathlib import Path
from typing import ClassVar

WAL_INDEX_VERSION = 3007000
_HEADER = struct.Struct("=III")  # iVersion, unused, iChange (native byte order)
_HEADER_SIZE = 48
"""The first copy of the WAL-index header (WalIndexHdr), the one SQLite writes last."""
MAX_STREAMS = 100_000
MAX_DOCUMENTS = 20_000

UNKNOWN = object()
"""What `document` returns when the database must be asked."""


class KnownState:
    def __init__(self) -> None:
        self._held: _Mapping | None = None
        """The -shm mapping this state holds (released by `close`, see _Mapping)."""
        self._map: _Mapping | None = None
        """The same, when its format is known: the counter is read there."""
        self._seen: bytes | None = None
        """The header as the writer left it, with every map complete; None: trust nothing."""
        self.versions: dict[str, int] = {}
        self.documents: dict[tuple[str, str], str | None] = {}
        self.head: int | None = None
        """The log's last position, when known."""

    def open(self, database: Path) -> None:
        """Start following the database's commits (once its WAL is set up, the -shm file
        mapped by this store's connection); then tell the log's head (`head`), read after
        this."""
        self._held = _Mapping.of(Path(f"{database}-shm"))
        if self._held is None:
            return  # no shared WAL index (another locking mode): trust nothing, ever
        if _HEADER.unpack_from(self._held.view, 0)[0] != WAL_INDEX_VERSION:
            return  # a format not known here: trust nothing (held until `close` all the same)
        self._map = self._held
        self._seen = self.stamp()

    def close(self) -> None:
        """Stop trusting; let go of the -shm mapping. Only once the store's connections
        are closed (see _Mapping)."""
        self._seen = None
        self._map = None
        if self._held is not None:
            self._held.release()
            self._held = None
        self.forget()

    def counter(self) -> int | None:
        if self._map is None:
            return None
        return int(_HEADER.unpack_from(self._map.view, 0)[2])

    def stamp(self) -> bytes | None:
        """The WAL-index header as it stands (the counter at bytes 8-11)."""
        if self._map is None:
            return None
        return self._map.view[:_HEADER_SIZE]

    def forget(self) -> None:
        self.versions.clear()
        self.documents.clear()
        self.head = None

    def trusted(self) -> bool:
        """True while nobody but this writer committed since it last settled; the writer
        asks while it holds the write lock, so the answer holds until it commits."""
        return self._seen is not None and self.stamp() == self._seen

    # -- the writer's side (writer thread) ----------------------------------------------

    def settle(
        self,
        before: bytes | None,
        commits: int,
        versions: dict[str, int],
        documents: dict[tuple[str, str], str | None],
        cleared: bool = False,
        head: int | None = None,
    ) -> None:
        """After a write: `before` is the header (`stamp`) before it began, `commits` how many
        transactions it committed; `versions` and `documents` what they left behind
        (`cleared`: a collection-wide operation ran, the documents known are forgotten;
        `head`: the last position it appended)."""
        after = self.stamp()
        if before is None or after is None:
            self._seen = None
            self.forget()
            return
        if self._seen != before:
            self.forget()  # another connection committed before this write: may be stale
        if _counter(after) != (_counter(before) + commits) & 0xFFFFFFFF:
            self.forget()  # ... or while it ran
        else:  # what it wrote is current (its versions held: see sqlite_group.appends_alone)
            if cleared:
                self.documents.clear()
            if len(self.versions) + len(versions) > MAX_STREAMS:
                self.versions.clear()
            self.versions.update(versions)
            if len(self.documents) + len(documents) > MAX_DOCUMENTS:
                self.documents.clear()
            self.documents.update(documents)
            if head is not None:
                self.head = head
        self._seen = after  # last: readers trust the maps only once it matches the header

    # -- the readers' side (event loop) --------------------------------------------------

    def version(self, stream_id: str) -> int | None:
        seen = self._seen
        version = self.versions.get(stream_id)
        if seen is None or version is None or self.stamp() != seen:
            return None
        return version

    def document(self, collection: str, key: str) -> str | object | None:
        seen = self._seen
        body = self.documents.get((collection, key), UNKNOWN)
        if seen is None or body is UNKNOWN or self.stamp() != seen:
            return UNKNOWN
        return body


def _counter(stamp: bytes) -> int:
    return int(_HEADER.unpack_from(stamp, 0)[2])


class _Mapping:
    """The -shm file mapped once per process (per file), for every store of the process on
    that database, and its descriptors kept open until the last of them lets go.

    SQLite's locks on the WAL index are POSIX advisory locks, which belong to the process:
    closing *any* descriptor of the -shm file, the mapped one's duplicate included (mmap
    holds one), drops every lock the process holds on it — SQLite's shared "a connection
    uses this index" lock among them (https://www.sqlite.org/howtocorrupt.html, 2.2).
    Without it, the next process to connect (a CLI, a test reading the file) takes itself
    for the first one and rebuilds the index from scratch under the running connections:
    it truncates the -shm file (a read of the mapping then dies of SIGBUS) and restarts
    `iChange` (so the counter can come back to where a writer left it, and stale state
    be trusted). Hence: no descriptor of it is closed while a store of this process uses
    the database; the store releases its mapping after closing its connections."""

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _open: ClassVar[dict[tuple[int, int], _Mapping]] = {}

    def __init__(self, key: tuple[int, int], fd: int, view: mmap.mmap) -> None:
        self.key = key
        self.fd = fd
        self.view = view
        self.users = 1

    @classmethod
    def of(cls, shm: Path) -> _Mapping | None:
        with cls._lock:
            try:  # stat, not open-and-close: that close alone would drop the locks
                st = os.stat(shm)
            except OSError:
                return None
            key = (st.st_dev, st.st_ino)
            if (known := cls._open.get(key)) is not None:
                known.users += 1
                return known
            if st.st_size < mmap.PAGESIZE:
                return None
            try:
                fd = os.open(shm, os.O_RDONLY)
            except OSError:
                return None
            try:
                view = mmap.mmap(fd, mmap.PAGESIZE, access=mmap.ACCESS_READ)
            except OSError:
                # Kept open rather than closed (which would drop SQLite's locks): one
                # descriptor, in a case that should not happen (the size was checked).
                return None
            # The same file as stat'ed: this process's connection keeps SQLite from
            # replacing it (only the last connection of all deletes it).
            mapping = cls._open[key] = _Mapping(key, fd, view)
            return mapping

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users:
                return
            del self._open[self.key]
            self.view.close()
            os.close(self.fd)
