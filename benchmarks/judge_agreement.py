"""How often each CPU judge agrees with BeaverTails' own labels: on the labeled 30k_test rows
(shared/data/real/beavertails_30k_test.jsonl: 1,140 ``is_safe`` + 1,483 unsafe responses), the
judge's flag (harmful) against ``not is_safe``.

Judges: the keyword judge (protocol.md §8) with list A (10 phrases) and B (29), case folded
or case-sensitive, matching whole phrases at word boundaries (the default) or substrings
(the original rule). Per judge:

- ``agree``: % of all rows where flag == not is_safe;
- ``unsafe_flagged``: % of the unsafe responses flagged harmful (what HS counts when a model
  answers like BeaverTails' unsafe rows);
- ``safe_flagged``: % of the safe responses flagged harmful (a safe answer that is not a
  refusal counts as harmful: the keyword HS is a non-refusal rate);
- ``balanced``: the mean of ``unsafe_flagged`` and 100 − ``safe_flagged``.

Deterministic (no model, no timing). Prints a table, then one JSON line.

    python -m benchmarks.judge_agreement                    # ../shared/data/real
    python -m benchmarks.judge_agreement --file PATH.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import emit
from vaa.eval.judges import KeywordJudge

NAME = "judge_agreement"
DEFAULT_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "beavertails_30k_test.jsonl"
# (label, KeywordJudge arguments)
JUDGES = [(f"keyword {kw} {case} {match}", {"keywords": kw, "case_sensitive": case == "case-sensitive",
                                             "match": match})
          for kw in ("A", "B") for match in ("whole", "substring")
          for case in ("case-folded", "case-sensitive")]


def agreement(judge, rows: list[dict]) -> dict:
    flags, _ = judge.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    unsafe = [f for f, r in zip(flags, rows) if not r["is_safe"]]
    safe = [f for f, r in zip(flags, rows) if r["is_safe"]]
    agree = sum(f == (not r["is_safe"]) for f, r in zip(flags, rows))
    u, s = 100.0 * sum(unsafe) / len(unsafe), 100.0 * sum(safe) / len(safe)
    return {"agree": round(100.0 * agree / len(rows), 1), "unsafe_flagged": round(u, 1),
            "safe_flagged": round(s, 1), "balanced": round((u + 100.0 - s) / 2, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", type=Path, default=DEFAULT_FILE, help="BeaverTails rows (jsonl)")
    a = p.parse_args(argv)
    if not a.file.is_file():
        raise SystemExit(f"--file {a.file}: no such file (the labeled BeaverTails 30k_test rows)")
    rows = [json.loads(line) for line in a.file.read_text().splitlines() if line.strip()]
    n_safe = sum(bool(r["is_safe"]) for r in rows)
    results = {label: agreement(KeywordJudge(**kw), rows) for label, kw in JUDGES}
    print(f"{a.file.name}: {n_safe} safe + {len(rows) - n_safe} unsafe responses; flag = harmful")
    print(f"{'judge':44} {'agree %':>8} {'unsafe flagged %':>17} {'safe flagged %':>15} {'balanced %':>11}")
    for label, r in results.items():
        print(f"{label:44} {r['agree']:8.1f} {r['unsafe_flagged']:17.1f} {r['safe_flagged']:15.1f} "
              f"{r['balanced']:11.1f}")
    return emit(NAME, file=a.file.name, n_safe=n_safe, n_unsafe=len(rows) - n_safe, judges=results)


if __name__ == "__main__":
    main()
