"""Where a writer of saves or exports may write: ``check_out`` refuses an output directory that is one of the
inputs, a file, or a save of another format (a table save under an export, or the reverse), so that writing
it cannot destroy what it reads or another kind of save. Used by ``pse.export`` and the tools' merge/export."""

from __future__ import annotations

import os
from typing import Sequence

from . import _format as F

__all__ = ["OutputError", "check_out"]


class OutputError(ValueError):
    """An output directory a writer refuses: one of its inputs, a file, or a save of another format."""


def check_out(paths: Sequence, out, fmt: str) -> str:
    """Refuse ``out`` (raises OutputError naming it) when it is one of ``paths``, is not a directory, or holds a
    manifest that is not of format ``fmt``; an earlier output of the same format may be replaced (the write is
    atomic: new data directory, then the manifest by rename). Returns ``out`` as an absolute path."""
    out = os.path.abspath(os.fspath(out))
    real = os.path.realpath(out)
    for p in paths:
        p = os.path.abspath(os.fspath(p))
        same = os.path.realpath(p) == real
        if not same and os.path.exists(p) and os.path.exists(out):
            try:
                same = os.path.samefile(p, out)
            except OSError:
                pass
        if same:
            raise OutputError(f"{out}: the output is also an input ({p}); writing it would replace what is read")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise OutputError(f"{out}: exists and is not a directory; the output must be a directory (or not exist yet)")
    mpath = os.path.join(out, F.MANIFEST)
    if os.path.lexists(mpath):
        found = F.peek_manifest(mpath, "format")
        if found != fmt:
            kinds = {F.FORMAT_NAME: "a table save", F.SERVING_FORMAT_NAME: "a serving export"}
            what, want = kinds.get(found, "an unreadable or unknown manifest"), kinds[fmt]
            raise OutputError(f"{out}: holds {what}, not {want}; refusing to replace it (choose another output)")
    return out
