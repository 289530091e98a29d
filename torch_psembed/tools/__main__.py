"""``python -m torch_psembed.tools inspect|verify|merge|export PATH ...``: work on saved tables and exports.

Commands:
    inspect PATH            a readable summary of a save or an export (``--json`` for the raw manifest)
    verify PATH...          check every file as a load would (sizes, checksums, keys, values); exit 1 on a problem
    merge BASE DELTA... -o OUT      apply deltas (in order) to a base or checkpoint; writes a base-mode save
    export PATH [DELTA...] -o OUT   write serving files (``--dtype``, ``--with-stats``, ``--rows``)

``-o`` may not name an input or a save of the other kind (a table save for export, an export for merge); an
earlier output of the same kind is replaced atomically. Errors print one line and exit with status 1 (usage
errors: argparse's message, status 2). ``verify`` checks every path it is given and fails if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from . import MAX_NUM_BUCKETS, inspect_path, merge, verify

__all__ = ["main"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _print_summary(info) -> None:
    m = info["manifest"]
    if info["kind"] == "serving":
        print(f"serving export  {info['path']}")
        print(f"  rows          {m['rows']:,} ({m.get('rows_exported', '?')} rows), dim {m['dim']}, dtype {m['dtype']}"
              f"{', with show/click' if m['with_stats'] else ''}")
        print(f"  day           {m.get('day')}")
        print(f"  files         {len(m['files'])} in {m['num_parts']} part(s), {_human(info['bytes'])}"
              f" ({info['bytes_per_key']:.1f} bytes/key)")
        return
    sig = m["signature"]
    print(f"{m['mode']} save  {info['path']}")
    print(f"  save id       {m['save_id']}")
    chain = "no base" if m["base_id"] is None else f"base {m['base_id']}"
    print(f"  chain         {chain}, sequence {m['sequence']}")
    print(f"  day           {m['day']}")
    print(f"  model         dim {sig['dim']}, lr {sig['lr_optimizer']['name']}, mf {sig['mf_optimizer']['name']}")
    print(f"  rows          {m['rows']:,} ({m['rows_with_mf']:,} with mf), tombstones {m['tombstones']:,}")
    print(f"  layout        base {m['layout']['base_width']} cols {m['layout'].get('base_columns', '?')}")
    print(f"                mf {m['layout']['mf_width']} cols")
    print(f"  files         {len(m['files'])} in {m['num_buckets']} buckets x {m['num_parts']} part(s), "
          f"{_human(info['bytes'])} ({info['bytes_per_key']:.1f} bytes/key)")
    print(f"  writer        {m.get('writer')}")


def _buckets(text: str) -> int:
    """``--buckets``: an int in [1, MAX_NUM_BUCKETS], the range a save may have (argparse names the option)."""
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or not 1 <= n <= MAX_NUM_BUCKETS:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {MAX_NUM_BUCKETS}, got {text!r}")
    return n


def _os_error(e: OSError) -> str:
    """One line naming the path(s) of an OSError."""
    if e.filename is None:
        return str(e)
    names = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
    return f"{names}: {e.strerror or e}"


def _print_error(e: BaseException) -> None:
    """The one line an error prints: its type, then its message (an OSError's path(s))."""
    print(f"ERROR {type(e).__name__}: {_os_error(e) if isinstance(e, OSError) else e}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m torch_psembed.tools", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("inspect", help="print a summary of a save or export")
    pi.add_argument("path")
    pi.add_argument("--json", action="store_true", help="print the manifest as JSON")
    pv = sub.add_parser("verify", help="check every file as a load would (sizes, checksums, keys, values)")
    pv.add_argument("paths", nargs="+", metavar="path")
    pm = sub.add_parser("merge", help="apply deltas to a base (or checkpoint), write a base save")
    pm.add_argument("paths", nargs="+", metavar="path",
                    help="a base or checkpoint save (not a delta), then its deltas in order")
    pm.add_argument("-o", "--out", required=True,
                    help="output directory (not an input, not a serving export; a table save there is replaced)")
    pm.add_argument("--buckets", type=_buckets, default=None,
                    help=f"buckets of the output, 1 to {MAX_NUM_BUCKETS} (default: one per 65,536 rows, at most 64, "
                         "as a save)")
    pe = sub.add_parser("export", help="write serving files from a save (and its deltas)")
    pe.add_argument("paths", nargs="+", metavar="path", help="a save, then optionally its deltas in order")
    pe.add_argument("-o", "--out", required=True,
                    help="output directory (not an input, not a table save; an earlier export there is replaced)")
    pe.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    pe.add_argument("--with-stats", action="store_true", help="also write show/click (for output='cvm_lr_mf')")
    pe.add_argument("--rows", default="mf", choices=["mf", "all"])
    args = p.parse_args(argv)

    try:
        if args.cmd == "inspect":
            info = inspect_path(args.path)
            if args.json:
                print(json.dumps(info["manifest"], indent=1))
            else:
                _print_summary(info)
        elif args.cmd == "verify":
            failed = 0
            for path in args.paths:  # each path gets its line: one bad save does not hide the others' state
                try:
                    r = verify(path)
                except (OSError, ValueError) as e:
                    failed += 1
                    _print_error(e)
                    continue
                print(f"OK  {r['path']}: {r['files']} files, {r['rows']:,} rows, {_human(r['bytes'])} verified")
            return 1 if failed else 0
        elif args.cmd == "merge":
            m = merge(args.paths, args.out, num_buckets=args.buckets)
            print(f"merged {len(args.paths)} saves into {os.path.abspath(args.out)}: {m['rows']:,} rows "
                  f"(base {m['base_id']}, sequence {m['sequence']})")
        elif args.cmd == "export":
            from ..checkpoint import export

            src = args.paths[0] if len(args.paths) == 1 else args.paths
            m = export(src, args.out, dtype=args.dtype, with_stats=args.with_stats, rows=args.rows)
            print(f"exported {m['rows']:,} rows (dim {m['dim']}, {m['dtype']}) to {os.path.abspath(args.out)}")
    # A damaged or mismatched save, a refused output (CorruptCheckpointError, CheckpointMismatchError and
    # OutputError are ValueErrors), a float16 export that would overflow; an output that cannot be written.
    except (OSError, ValueError) as e:
        _print_error(e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
