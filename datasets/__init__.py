"""Public face data sets, fetched from their published locations into the layout the other stages read.

- :mod:`.download`: :class:`Remote` (a file, its URL and pinned digest) and :func:`fetch` (streamed,
  resumable with HTTP ``Range``, verified before it gets its name);
- :mod:`.unpack`: :func:`unpack_tar`, tar extraction that refuses members outside the folder;
- :mod:`.lfw`: :func:`fetch_lfw` (``facefuse data lfw DIR``): LFW's archive and pairs files, aligned
  into ``DIR/lfw`` as ``FACEFUSE_DATA=DIR`` expects.

Importing this package opens no connection and loads no detector.
"""

from .download import Remote, fetch, file_digest
from .lfw import ARCHIVES, PAIRS, LfwRelease, LfwSummary, fetch_lfw, lfw_release
from .unpack import unpack_tar

__all__ = ["Remote", "fetch", "file_digest", "ARCHIVES", "PAIRS", "LfwRelease", "LfwSummary", "fetch_lfw",
           "lfw_release", "unpack_tar"]
