"""Data rules: slices that select rows, splits large enough for what reads them, files that exist.

The synthetic world's table sizes are known from the config (``data.*``), so every split a
stage reads is sized before the world is written: the attack's task rows and harmful rows
(floor((1-p)n) and floor(pn), vaa.data.datamodule.hft_mix), the test split, the alignment
set, each extra stream a method ``requires`` and VAA stage 1's proxy runs. Real data is checked
for its folder and files (``data.root``, ``data.<table>.path``) and its slices; the sizes of
real tables are checked when the data stage reads them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from vaa.config.checker import Checker
from vaa.data.hub import LOCAL_TABLES, TASK_TABLES, is_real_data
from vaa.data.proxy_check import proxy_overlaps

# (dataset, split) of the synthetic world -> the data.* size of that table
WORLD_TABLES = {("beavertails", "align"): "align", ("beavertails", "harmful"): "harmful_pool",
                ("beavertails", "proxy_harmful"): "proxy_pool",
                ("beavertails", "align_harmful"): "align_harmful_pool", ("beavertails", "test"): "hs_test"}
for _d, _train, _test in (("sst2", "train", "validation"), ("ag_news", "train", "test"),
                          ("gsm8k", "train", "test")):
    WORLD_TABLES[(_d, _train)], WORLD_TABLES[(_d, _test)] = "task_train", "task_test"
WORLD_TABLES[("alpaca", "train")] = "task_train"  # VAA stage 1's proxy rows (vaa/world/tasks.py)
# the chosen task's folder -> its tables (real data); alpaca_eval has one table
TASK_FOLDER_TABLES = {f: tables[:2] for f, tables in TASK_TABLES.items()} | {"alpaca_eval": ("alpaca_eval",)}
# real data: beavertails/<split> -> the data.* slice that selects it (vaa.data.hub.beavertails_slices)
REAL_SLICES = {"align": "align_rows", "harmful": "harmful_rows", "proxy_harmful": "proxy_rows",
               "align_harmful": "align_harmful_rows", "test": "hs_rows", "base": "base_rows"}
WORLD_COUNTS = ("base_harmful", "base_benign", "base_task", "align", "harmful_pool", "proxy_pool",
                "align_harmful_pool", "hs_test", "task_train", "task_test")
WORLD_FRACTIONS = ("align_benign_frac", "borrowed_verb_frac", "domain_frac", "negation_frac",
                   "train_label_noise")


def slice_rule(c: Checker, start_key: str = "start", stop_key: str = "stop") -> bool:
    """``[start:stop]`` of a split: start >= 0 and stop null or > start; a negative start (the
    last |start| rows) only with stop null. Returns whether the slice is usable."""
    start, stop = c.get(start_key), c.get(stop_key)
    ok = True
    if not isinstance(start, int) or isinstance(start, bool):
        c.fail(start_key, "must be an integer (the first row; negative: the last rows, with stop null)")
        return False
    if stop is not None and (not isinstance(stop, int) or isinstance(stop, bool)):
        c.fail(stop_key, "must be an integer or null (to the end)")
        return False
    if start < 0 and stop is not None:
        c.fail(start_key, f"a negative start (the last {-start} rows) needs {c.prefix}{stop_key}=null, "
                          f"got {c.prefix}{stop_key}={stop}")
        ok = False
    elif stop is not None and (stop < 0 or stop <= start):
        c.fail(stop_key, f"must be null (to the end) or an integer > {c.prefix}{start_key}={start} "
                         f"(rows [start, stop) are used)")
        ok = False
    return ok


def world_rows(data, dataset: str, split: str) -> Optional[int]:
    """Rows of a synthetic-world table (None: not a table the world writes)."""
    if (dataset, split) == ("alpaca_eval", "eval"):
        return data.task_train + data.task_test
    key = WORLD_TABLES.get((dataset, split))
    return None if key is None else data[key]


def sliced(n: int, start: int, stop: Optional[int]) -> int:
    return len(range(n)[start:stop])


class DataRules:
    """Data checks for one config; ``rows(...)`` is None wherever the size is unknown (real data)."""

    def __init__(self, cfg, problems):
        self.cfg, self.problems = cfg, problems
        self.real = is_real_data(cfg.data)
        self.data = Checker(cfg.data, "data.", problems, cfg)

    def rows(self, dataset: str, split: str, start: int = 0, stop: Optional[int] = None) -> Optional[int]:
        if self.real:
            n = self.real_rows(dataset, split)
            return None if n is None else sliced(n, start, stop)
        n = world_rows(self.cfg.data, dataset, split)
        return None if n is None or not isinstance(n, int) else sliced(n, start, stop)

    def real_rows(self, dataset: str, split: str) -> Optional[int]:
        """Rows of a real-data split, where cheap to know: a BeaverTails slice with both bounds
        (an upper bound: data.<slice>), a task's train split from its local JSON Lines table
        (non-blank lines, less data.train_tail, at most data.task_rows). None: unknown."""
        d = self.cfg.data
        if dataset == "beavertails":
            key = REAL_SLICES.get(split)
            sl = d.get(key) if key else None
            if sl is None or not isinstance(sl.start, int) or not isinstance(sl.stop, int) or sl.start < 0:
                return None
            return max(0, sl.stop - sl.start)
        if dataset in TASK_TABLES and split == "train":
            n = self.table_lines(TASK_TABLES[dataset][0])
            if n is not None and d.get("fa_test") == "train_tail":
                n = max(0, n - d.train_tail)
            if n is not None and d.get("task_rows") is not None:
                n = min(n, d.task_rows)
            return n
        if (dataset, split) == ("alpaca_eval", "eval"):
            return self.table_lines("alpaca_eval")
        return None

    def table_lines(self, name: str) -> Optional[int]:
        t, root = self.cfg.data.get(name), self.cfg.data.root
        if t is None or not t.path or not str(t.path).endswith(".jsonl"):
            return None
        p = Path(str(t.path)).expanduser()
        p = p if p.is_absolute() or root is None else Path(str(root)).expanduser() / p
        if not p.is_file() or p.stat().st_size > 256 << 20:
            return None
        with p.open(encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if line.strip())

    def check_world(self) -> None:
        if self.real:
            self.check_real()
            return
        d = self.data
        d.count(*(k for k in WORLD_COUNTS if d.has(k)), minimum=0)
        for k in ("align", "hs_test", "task_train", "task_test"):
            d.count(k, meaning="rows the pipeline reads from this table")
        d.unit(*(k for k in WORLD_FRACTIONS if d.has(k)))
        d.nonneg("category_skew")

    def check_real(self) -> None:
        d, data = self.data, self.cfg.data
        root = data.root
        if root is not None and not Path(str(root)).expanduser().is_dir():
            d.fail("root", "does not exist; point data.root at the folder of the data files "
                           "(e.g. shared/data/real)")
            root_missing = True
        else:
            root_missing = False
        task_folder = self.cfg.task.dataset
        needed = ["beavertails_train", "beavertails_test", *TASK_FOLDER_TABLES.get(task_folder, ())]
        if data.align_source == "refusals":
            needed.append("refusals")
        d.one_of("align_source", ("beavertails", "refusals", "beavertails_refusals"))
        d.one_of("hs_overlap", ("redraw", "drop"))
        d.one_of("refusal_keywords", ("A", "B"))
        d.one_of("fa_test", ("official", "train_tail"))
        for name in needed:
            if name not in LOCAL_TABLES or name not in data:
                continue
            t = data[name]
            if not t.path:
                if not t.hub:
                    d.fail(f"{name}.path", "no file and no hub name; set data.{name}.path=FILE")
                continue
            p = Path(str(t.path)).expanduser()
            if p.is_absolute() or root is not None:
                if root_missing and not p.is_absolute():
                    continue  # one line for the folder, not one per file in it
                full = p if p.is_absolute() else Path(str(root)).expanduser() / p
                if not full.is_file():
                    d.fail(f"{name}.path", f"no file at {full}; put the table there or set "
                                           f"data.{name}.path")
            else:
                d.fail("root", f"is not set, and data.{name}.path={t.path} is relative to it: "
                               f"data.root=DIR (the folder holding {t.path})")
                break
        for k in ("align_rows", "harmful_rows", "proxy_rows", "align_harmful_rows", "hs_rows", "base_rows"):
            empty_base = k == "base_rows" and k in data and data[k].get("start") == 0 == data[k].get("stop")
            if k in data and not empty_base:  # base_rows [0, 0): no base corpus (the schema's default)
                slice_rule(d.at(k))
        d.count("fa_test_n", "task_rows", optional=True)
        d.count("train_tail", "task_train", "task_test")

    # ------------------------------------------------------------------ cross-field sizes --
    def need(self, key: str, needed: int, rows: Optional[int], what: str, fix: str) -> None:
        """``needed`` rows of ``what`` are read from a split of ``rows`` (None: unknown, unchecked)."""
        if rows is not None and needed > rows:
            Checker(self.cfg, "", self.problems).fail(
                key, f"needs {needed} {what} but there are {rows}; {fix}")

    def hft_mix(self, key: str, n, p, task_rows: Optional[int], pool: str) -> None:
        """floor((1-p)n) task rows and floor(pn) rows of beavertails/<pool> (hft_mix)."""
        if not (isinstance(n, int) and isinstance(p, (int, float)) and 0 <= p <= 1 and n >= 1):
            return  # the range rules already reported it
        benign, harm = math.floor((1 - p) * n + 1e-9), math.floor(p * n + 1e-9)
        if task_rows is not None and benign > task_rows:
            self.need(f"{key}.n", benign, task_rows, "task rows (floor((1-p)n)) of the train split",
                      f"lower {key}.n or enlarge the split")
            return
        self.need(f"{key}.harmful_ratio", harm, self.rows("beavertails", pool),
                  f"harmful rows (floor({p} x {n})) of beavertails/{pool}",
                  f"lower {key}.harmful_ratio or {key}.n")

    def check_task(self) -> None:
        t = self.cfg.task
        tc = Checker(t, "task.", self.problems, self.cfg)
        train_ok = slice_rule(tc.at("train"))
        test_ok = slice_rule(tc.at("test"))
        if train_ok:
            rows = self.rows(t.dataset, t.train.file, t.train.start, t.train.stop)
            if rows == 0:
                tc.fail("train.start", f"selects no rows of {t.dataset}/{t.train.file}")
            self.hft_mix("attack", self.cfg.attack.n, self.cfg.attack.harmful_ratio, rows, "harmful")
        if test_ok and self.rows(t.dataset, t.test.file, t.test.start, t.test.stop) == 0:
            tc.fail("test.start", f"selects no rows of {t.dataset}/{t.test.file} (the FA test split)")
        if self.real and self.cfg.data.get("task_rows") is not None and isinstance(self.cfg.attack.n, int):
            self.need("attack.n", self.cfg.attack.n, self.cfg.data.task_rows,
                      "task rows (data.task_rows caps them)", "lower attack.n or raise data.task_rows")

    def check_stream(self, key: str, d) -> None:
        """An extra data stream a method requires (``extra_data.<name>``)."""
        c = Checker(d, f"{key}.", self.problems, self.cfg)
        if slice_rule(c) and self.rows(d.dataset, d.split, d.start, d.stop) == 0:
            c.fail("start", f"selects no rows of {d.dataset}/{d.split}")

    def check_estimate(self, est) -> None:
        for i, p in enumerate(est.proxies):
            c = Checker(p, f"dro.estimate.proxies.{i}.", self.problems, self.cfg)
            if slice_rule(c):
                rows = self.rows(p.dataset, p.split, p.start, p.stop)
                self.hft_mix("dro.estimate", est.n, p.harmful_ratio, rows, "proxy_harmful")
        # the proxies never read an attack's rows (vaa.data.proxy_check; issue 12 item 3)
        self.problems.extend(proxy_overlaps(self.cfg, lambda ds, split: self.rows(ds, split)))
