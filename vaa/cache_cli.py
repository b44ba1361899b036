"""``vaa-cache``: see and prune the artifact cache (``paths.cache_dir`` / ``$VAA_CACHE_DIR``).

    vaa-cache ls [--stage S] [--json]      every entry: key, stage, status, size, age, built by
    vaa-cache du                           totals per stage
    vaa-cache gc [--older-than 24h]        remove abandoned .tmp-* / .work-* folders
    vaa-cache rm KEY [KEY ...] [--force]   remove entries (a unique key prefix is enough)
    vaa-cache prune [--older-than 7d] [--stage finetuned] [--force]

The root is found as ``vaa`` finds it: ``--cache-dir DIR`` or ``paths.cache_dir=DIR`` (Hydra
style, anywhere on the line), else ``$VAA_CACHE_DIR``, else ``~/.cache/vaa``. A root that
does not exist (a mistyped ``--cache-dir``) is a user error naming the folder, not an empty
cache. Removal is safe beside running jobs: see vaa/pipeline/cache_inventory.py. An entry a running job uses
(vaa/pipeline/entry_users.py) or builds (its lock) is kept, naming that job's pid and host;
``--force`` removes a used one anyway. Exit codes: 0 ok, 2 user error, 1 an entry was kept.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

from vaa.pipeline.cache import ArtifactCache, resolve_cache_dir
from vaa.pipeline.cache_inventory import Item, collect, match_keys, remove, scan, status
from vaa.pipeline.entry_users import in_use

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' (a bare number: seconds) → seconds."""
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; use e.g. 90s, 30m, 12h, 7d, 2w")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_age(s: float) -> str:
    if s == float("inf"):
        return "?"
    for unit, div in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= div:
            return f"{s / div:.1f}{unit}"
    return f"{s:.0f}s"


def split_hydra_style(argv: list[str]) -> tuple[list[str], str | None]:
    """Pull ``paths.cache_dir=DIR`` (optionally ``+``/``++``-prefixed) out of argv."""
    rest, cache_dir = [], None
    for a in argv:
        m = re.match(r"^\+{0,2}paths\.cache_dir=(.*)$", a)
        if m:
            cache_dir = m.group(1)
        else:
            rest.append(a)
    return rest, cache_dir


FORCE_HELP = ("remove an entry even when a running job uses it (that job then fails); an entry "
              "being built (its lock held) is still kept")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vaa-cache", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Also accepted anywhere: paths.cache_dir=DIR (as vaa takes it).")
    p.add_argument("--cache-dir", default=None, help="cache root (default: $VAA_CACHE_DIR, else ~/.cache/vaa)")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("ls", help="list entries: key, stage, status, size, age, overrides, upstream")
    ls.add_argument("--stage", default=None, help="only this stage (key prefix or pipeline stage name)")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    sub.add_parser("du", help="sizes per stage")
    gc = sub.add_parser("gc", help="remove .tmp-*/.work-* folders whose builder is gone")
    gc.add_argument("--older-than", type=duration, default=duration("24h"),
                    help="a folder of another host (or without a builder record) counts as abandoned "
                         "after this long without changes (default 24h; this host: by pid)")
    gc.add_argument("--dry-run", action="store_true")
    rm = sub.add_parser("rm", help="remove entries by key (a unique prefix is enough)")
    rm.add_argument("keys", nargs="+")
    rm.add_argument("--dry-run", action="store_true")
    rm.add_argument("--force", action="store_true", help=FORCE_HELP)
    pr = sub.add_parser("prune", help="remove complete entries by age and/or stage")
    pr.add_argument("--older-than", type=duration, default=None, help="e.g. 7d")
    pr.add_argument("--stage", default=None, help="e.g. finetuned, eval, eval_finetuned")
    pr.add_argument("--dry-run", action="store_true")
    pr.add_argument("--force", action="store_true", help=FORCE_HELP)
    return p


def _stage_matches(item: Item, stage: str | None) -> bool:
    return stage is None or stage in (item.stage, item.description)


def cmd_ls(cache: ArtifactCache, args) -> int:
    items = [i for i in scan(cache) if _stage_matches(i, args.stage)]
    for i in items:
        prov = i.provenance
        user = in_use(cache, i.key) if i.kind == "complete" else ""
        row = {"key": i.key, "stage": i.description, "kind": i.kind,
               "status": status(i, 24 * 3600) + (f", in use by {user}" if user else ""),
               "size_bytes": i.size, "age_s": round(i.age_s, 1), "overrides": prov.get("overrides"),
               "upstream": prov.get("upstream"), "builder": i.builder, "path": str(i.path)}
        if args.json:
            print(json.dumps(row))
            continue
        print(f"{i.key:<28} {i.description:<15} {human_size(i.size):>9} {human_age(i.age_s):>6}  {row['status']}")
        if prov.get("overrides") is not None or prov.get("upstream"):
            over = " ".join(prov.get("overrides") or []) or "(defaults)"
            up = prov.get("upstream") or []
            up = ", ".join(f"{k}={v}" for k, v in up.items()) if isinstance(up, dict) else ", ".join(up)
            print(f"{'':<4}built by: vaa {over}" + (f"   upstream: {up}" if up else ""))
    if not args.json:
        print(f"{len(items)} folders, {human_size(sum(i.size for i in items))} in {cache.root}")
    return 0


def cmd_du(cache: ArtifactCache, args) -> int:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for i in scan(cache):
        name = i.stage if i.kind == "complete" else f"({i.kind})"
        totals[name][0] += 1
        totals[name][1] += i.size
    print(f"{'stage':<16} {'entries':>7} {'size':>10}")
    for name, (n, size) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:<16} {n:>7} {human_size(size):>10}")
    print(f"{'total':<16} {sum(n for n, _ in totals.values()):>7} "
          f"{human_size(sum(s for _, s in totals.values())):>10}   {cache.root}")
    return 0


def _report(done, refused, verb: str, dry: bool) -> int:
    for i, why in done:
        print(f"{'would remove' if dry else verb} {i.path.name} ({human_size(i.size)}){': ' + why if why else ''}")
    for i, why in refused:
        print(f"kept {i.path.name}: {why}")
    print(f"{'would free' if dry else 'freed'} {human_size(sum(i.size for i, _ in done))}")
    return 0


def cmd_gc(cache: ArtifactCache, args) -> int:
    removed, kept = collect(cache, args.older_than, dry_run=args.dry_run)
    return _report(removed, kept, "removed", args.dry_run)


def cmd_rm(cache: ArtifactCache, args) -> int:
    chosen = match_keys(scan(cache), args.keys)
    done, refused = remove(cache, chosen, dry_run=args.dry_run, force=args.force)
    _report([(i, "") for i in done], refused, "removed", args.dry_run)
    return 1 if refused else 0


def cmd_prune(cache: ArtifactCache, args) -> int:
    if args.older_than is None and args.stage is None:
        raise ValueError("prune needs --older-than (e.g. 7d) and/or --stage (e.g. finetuned)")
    chosen = [i for i in scan(cache) if i.kind in ("complete", "incomplete") and _stage_matches(i, args.stage)
              and (args.older_than is None or i.age_s > args.older_than)]
    done, refused = remove(cache, chosen, dry_run=args.dry_run, force=args.force)
    _report([(i, f"{i.description}, {human_age(i.age_s)} old") for i in done], refused, "removed", args.dry_run)
    return 1 if refused else 0


COMMANDS = {"ls": cmd_ls, "du": cmd_du, "gc": cmd_gc, "rm": cmd_rm, "prune": cmd_prune}


def missing_root(root, args, hydra_dir: str | None) -> str | None:
    """One line when the cache root is not a folder (naming it, where the name came from and
    how to set it), else None."""
    if root.is_dir():
        return None
    source = ("--cache-dir" if args.cache_dir else "paths.cache_dir" if hydra_dir
              else "$VAA_CACHE_DIR" if os.environ.get("VAA_CACHE_DIR", "").strip() else "the default")
    what = "is not a folder" if root.exists() else "does not exist"
    return (f"vaa-cache {args.cmd}: the cache folder {root} ({source}) {what}; give the root your "
            f"vaa runs use with --cache-dir DIR, VAA_CACHE_DIR=DIR or paths.cache_dir=DIR")


def main(argv: list[str] | None = None) -> int:
    rest, hydra_dir = split_hydra_style(list(sys.argv[1:] if argv is None else argv))
    args = parser().parse_args(rest)
    cache = ArtifactCache(resolve_cache_dir(args.cache_dir or hydra_dir))
    if (problem := missing_root(cache.root, args, hydra_dir)) is not None:
        print(problem, file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.cmd](cache, args)
    except ValueError as e:
        print(f"vaa-cache {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
