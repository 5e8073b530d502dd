"""The Prometheus text exposition, rendered at most once per cycle and served from memory.

Each source (a collector, the agent's own metrics) has a chunk. After its
cycle a source says its chunk changed and how to render it (`set_source`);
the chunk is rendered when someone asks for the exposition, once, however
many scrapers ask: an agent sampling every second for a Prometheus scraping
every 15 s renders once per scrape, not 15 times. A scrape joins the chunks
(cached until one changes) and never touches hardware: the families come
from the collectors' last snapshots.

The gzip form is compressed at most once per change, and only the chunks that
changed: each chunk is a run of raw deflate blocks ending on a byte boundary
(a sync flush), so the runs of the chunks, in order, make one deflate stream
and one gzip member, the same for any decoder as compressing the whole body.
"""

from __future__ import annotations

import struct
import threading
import zlib
from typing import Callable, Iterable

from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString
from prometheus_client.metrics_core import Metric

# The classic text format, which every Prometheus since 2.0 reads; newer clients
# announce version=1.0.0, which older servers do not know.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Families:
    """The registry interface `generate_latest` expects, over a ready list of families."""

    def __init__(self, families: Iterable[Metric]):
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def reference_render(families: Iterable[Metric]) -> bytes:
    """prometheus-client's own renderer: what `render` must produce, byte for byte (tested)."""
    return generate_latest(_Families(families))


def render(families: Iterable[Metric]) -> bytes:
    """The text format for our families, about 3x faster than `generate_latest`, which
    validates every name and label again on every call; ours are fixed in code."""
    out: list[str] = []
    for m in families:
        name, kind = m.name, m.type
        if kind == "counter":
            name += "_total"
        elif kind == "unknown":
            kind = "untyped"
        doc = m.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        for sample in m.samples:
            if sample.labels:
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sample.labels.items()))
                out.append(f"{sample.name}{{{labels}}} {floatToGoString(sample.value)}\n")
            else:
                out.append(f"{sample.name} {floatToGoString(sample.value)}\n")
    return "".join(out).encode()


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
    return value


GZIP_LEVEL = 5
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, mtime 0, unknown OS
FINAL_BLOCK = b"\x03\x00"  # an empty fixed-Huffman block with BFINAL set: the end of the deflate stream


def deflate_run(data: bytes) -> bytes:
    """`data` as raw deflate blocks that end on a byte boundary and leave the stream open."""
    z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)


def gzip_member(runs: Iterable[bytes], data: bytes) -> bytes:
    """One gzip member of `data`, from the deflate runs of its parts in order."""
    return b"".join([GZIP_HEADER, *runs, FINAL_BLOCK,
                     struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)])


class Exposition:
    def __init__(self) -> None:
        self._chunks: dict[str, bytes] = {}
        self._pending: dict[str, Callable[[], bytes | None]] = {}
        self._runs: dict[str, tuple[bytes, bytes]] = {}  # source -> (its text, that text as a deflate run)
        self._lock = threading.RLock()  # a source's render may say another source changed
        self._body: bytes | None = None
        self._gzipped: bytes | None = None

    def set_chunk(self, source: str, text: bytes) -> None:
        """`source`'s chunk, rendered."""
        with self._lock:
            self._pending.pop(source, None)
            self._store(source, text)

    def set_source(self, source: str, render: Callable[[], bytes | None]) -> None:
        """`source`'s chunk changed: `render()` gives its text (None: keep the last one), called when
        the exposition is next asked for. Sources named `_...` render after the others (the agent's
        own metrics count the others' render failures)."""
        with self._lock:
            self._pending[source] = render

    def _store(self, source: str, text: bytes) -> None:
        if self._chunks.get(source) != text:
            self._chunks[source] = text
            self._body = self._gzipped = None

    def _update(self) -> None:
        pending = self._pending
        while pending:
            source = next((s for s in pending if not s.startswith("_")), None) or next(iter(pending))
            text = pending.pop(source)()
            if text is not None:
                self._store(source, text)

    def _joined(self) -> bytes:
        if self._body is None:
            self._body = b"".join(self._chunks[k] for k in sorted(self._chunks))
        return self._body

    def body(self) -> bytes:
        with self._lock:
            self._update()
            return self._joined()

    def gzipped(self) -> bytes:
        with self._lock:
            self._update()
            if self._gzipped is None:
                runs = []
                for source in sorted(self._chunks):
                    text = self._chunks[source]
                    run = self._runs.get(source)
                    if run is None or run[0] != text:
                        run = self._runs[source] = (text, deflate_run(text))
                    runs.append(run[1])
                self._gzipped = gzip_member(runs, self._joined())
            return self._gzipped
