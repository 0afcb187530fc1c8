# The native reader (native/read_blobs.c), present when a C compiler built it at install.

def read_blobs(
    paths: list[str], sizes: list[int], hash: bool, /
) -> list[tuple[bytes, str | None, float] | int]:
    """Each file whole (up to one byte past its size) and its BLAKE3 if ``hash``, or the errno of its failed
    open or read, with the GIL released once for the batch."""

def hash_blobs(datas: list[bytes], /) -> list[str]:
    """Each buffer's BLAKE3 (hex), with the GIL released once for the batch."""
