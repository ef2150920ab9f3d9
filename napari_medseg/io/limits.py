"""Guards that run before a reader allocates: regular files only, headers that fit their files.

A header states how many bytes of voxels follow it. A damaged or hostile file can claim far
more than it holds (a 70-byte ``.nii.gz`` claiming 1000^3 voxels), and a reader that trusts it
allocates gigabytes before it finds the data missing. These checks compare the claim with the
file first, without decoding the voxels:

* uncompressed data: the file must be at least ``offset + claimed`` bytes long;
* gzip/zlib data: deflate expands at most :data:`DEFLATE_MAX_RATIO` times, so a claim above that
  is refused at once; a claim far above a typical ratio is checked by streaming the decompressed
  bytes (counted, not kept) and stopping as soon as the claim is met or the stream ends early;
* any data: the decoded image must fit in the memory available now.

Named pipes, devices and sockets are refused before they are opened (reading a FIFO blocks
until a writer comes; ``/dev/zero`` never ends).
"""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path

from napari_medseg.errors import ImageReadError

#: Deflate (gzip, zlib) cannot expand more than about 1032:1.
DEFLATE_MAX_RATIO = 1032
#: Compressed files whose claimed size is at most this many times the file are decoded
#: directly (medical images compress 2-10x); above it the claim is verified by streaming first.
STREAM_CHECK_RATIO = 20


def available_memory() -> int | None:
    """Bytes of memory available to this process (None when it cannot be told)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def require_regular_file(path: str | os.PathLike) -> None:
    """Refuse anything that is not a regular file (FIFO, device, socket) before opening it.

    Symlinks are followed: a link to a regular file is fine, a link to ``/dev/zero`` is not.

    Raises
    ------
    ImageReadError
        Missing path, folder, or a special file, in one sentence.
    """
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise ImageReadError(f"{p} does not exist.") from None
    except OSError as e:
        raise ImageReadError(f"{p.name} cannot be read: {e.strerror or e}.") from e
    if stat.S_ISDIR(mode):
        raise ImageReadError(f"{p} is a folder, not an image file.")
    if not stat.S_ISREG(mode):
        kind = (
            "a named pipe (FIFO)"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise ImageReadError(f"{p.name} is {kind}, not an image file; give a regular file.")


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_fits_memory(name: str, nbytes: int, shape: tuple[int, ...]) -> None:
    """Refuse an image whose decoded voxels would not fit in the memory available now."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise ImageReadError(
            f"{name}: its header claims {tuple(shape)} voxels ({_gb(nbytes)}), more than the "
            f"{_gb(avail)} of memory available; the header is wrong or the image needs a "
            "bigger machine."
        )


def stream_length(
    path: str | os.PathLike, need: int, *, start: int = 0, chunk: int = 1 << 18
) -> int:
    """Decompress a gzip or zlib stream, counting bytes without keeping them, until ``need``.

    Parameters
    ----------
    path : path-like
    need : int
        Stop as soon as this many decompressed bytes are seen.
    start : int
        Byte offset of the compressed stream in the file (0 for ``.gz`` files).

    Returns
    -------
    int
        Decompressed bytes found (``>= need`` when the file holds them; less when the stream
        ends or breaks first). Memory stays at about one chunk.
    """
    n = 0
    dec = zlib.decompressobj(47)  # 32 + 15: a gzip or a zlib header, told apart by zlib
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            pending = b""
            while n < need:
                if not pending:
                    pending = fh.read(chunk)
                    if not pending:
                        break
                out = dec.decompress(pending, min(chunk, need - n))
                pending = dec.unconsumed_tail
                n += len(out)
                if dec.eof:
                    if not dec.unused_data:
                        break
                    # a multi-member gzip file: go on with the next member
                    rest = dec.unused_data
                    dec = zlib.decompressobj(47)
                    pending = rest
    except (OSError, zlib.error):
        pass
    return n


def check_payload(
    path: str | os.PathLike,
    name: str,
    *,
    shape: tuple[int, ...],
    itemsize: int,
    offset: int = 0,
    gzipped: bool = False,
    decoded_itemsize: int | None = None,
    data_start: int = 0,
    stream: bool = False,
) -> None:
    """Check a header's claim (``shape`` x ``itemsize`` bytes after ``offset``) against the file.

    Parameters
    ----------
    path : path-like
        The file that holds the voxels (for a detached header, the data file).
    name : str
        How the file is named in the message.
    shape : tuple of int
        Voxel counts the header states, in any axis order.
    itemsize : int
        Bytes per stored voxel (all channels).
    offset : int
        Bytes before the voxels (in the decompressed stream when ``gzipped``).
    gzipped : bool
        The voxels are one gzip or zlib stream (``.nii.gz``, NRRD ``encoding: gzip``,
        MetaImage ``CompressedData = True``) starting at byte ``data_start`` of the file;
        ``offset`` then counts decompressed bytes before the voxels.
    decoded_itemsize : int, optional
        Bytes per voxel once decoded (4 when scaling makes float32); default ``itemsize``.
    data_start : int
        Byte offset of the compressed stream in the file (``gzipped`` only).
    stream : bool
        Always verify a compressed stream to its claimed end (counted, not kept), whatever
        the ratio: for readers that decode only part of the file (``info``) and would not see
        a truncation otherwise.

    Raises
    ------
    ImageReadError
        The file is shorter than its header says, or the image would not fit in memory.
    """
    nvox = 1
    for s in shape:
        nvox *= int(s)
    payload = nvox * int(itemsize)
    claimed = int(offset) + payload
    size = os.stat(path).st_size - int(data_start)
    short = (
        f"{name} could not be read: it is truncated or corrupt (its header claims "
        f"{tuple(shape)} voxels, {_gb(payload)}, but the file holds "
    )
    if not gzipped:
        if size < claimed:
            raise ImageReadError(short + f"{size} bytes).")
    else:
        if claimed > DEFLATE_MAX_RATIO * size + 1024:
            raise ImageReadError(short + f"{size} compressed bytes, which cannot decode to that).")
        if stream or claimed > STREAM_CHECK_RATIO * size:
            found = stream_length(path, claimed, start=int(data_start))
            if found < claimed:
                raise ImageReadError(short + f"{found} bytes once decompressed).")
    check_fits_memory(name, nvox * int(decoded_itemsize or itemsize), shape)
