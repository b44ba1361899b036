"""Real datasets → the pipeline's data folder (protocol.md §2-3).

The data stage reads each upstream table from a local file (``data.<table>.path``: json,
jsonl, csv or parquet with the upstream columns) or from the Hugging Face hub
(``data.<table>.hub``), draws the protocol's slices and writes them in the synthetic world's
layout, ``<dataset>/<split>.jsonl``, so every loader, template, scorer and task config serves
both. Every written row gets a ``uid`` (``<source>#<row index>``); the alignment rows, every
harmful slice, the HS prompts (and a tiny model's base corpus) are asserted pairwise
disjoint by uid and, against the HS prompts, by content (vaa.data.beavertails: a training row
whose prompt is an HS prompt is dropped or re-drawn, counted in ``data.json``), and each
task's train rows disjoint from its test rows.

Slices (``data.align_rows`` …) count rows of one kind in table order: safe rows for the
alignment set (or refusal rows, ``data.align_source``), unsafe rows for the harmful
slices and the HS prompts. A table that cannot be read fails at once with the key to set.
Task tables are read when present; a task whose table is missing fails when it is used,
with the same message.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

from vaa.data.beavertails import assert_disjoint as _assert_disjoint
from vaa.data.beavertails import beavertails_slices as _beavertails_slices
from vaa.data.beavertails import with_uids as _uid
from vaa.data.content import content_key, keys_of
from vaa.data.io import read_rows
from vaa.models.hub import MissingResource, hub_reachable

MISSING = "MISSING.txt"  # written into a task's folder when its table could not be read
# task folder -> (train table, official test table, test split name the task config reads)
TASK_TABLES = {"sst2": ("sst2_train", "sst2_validation", "validation"),
               "ag_news": ("ag_news_train", "ag_news_test", "test"),
               "gsm8k": ("gsm8k_train", "gsm8k_test", "test")}
DATA_CODE = ("hub.py", "beavertails.py", "content.py", "../eval/judges.py")  # digested into the data stage's key
LOCAL_TABLES = ("beavertails_train", "beavertails_test", "refusals", "sst2_train",
                "sst2_validation", "ag_news_train", "ag_news_test", "gsm8k_train", "gsm8k_test",
                "alpaca_eval", "alpaca")


def is_real_data(data_cfg) -> bool:
    return "beavertails_train" in data_cfg


def table_path(d, name: str) -> Path | None:
    t = d[name]
    if not t.path:
        return None
    p = Path(t.path).expanduser()
    return p if p.is_absolute() or not d.root else Path(d.root).expanduser() / p


@contextmanager
def _offline(on: bool):
    """Make ``datasets`` use its local cache only (its flags are read at import)."""
    import datasets.config as dc
    import huggingface_hub.constants as hc

    old = dc.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE
    if on:
        dc.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dc.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE = old


def read_table(d, name: str) -> tuple[list[dict], str]:
    """(rows, source id) of one upstream table; MissingResource names ``data.<name>.path``."""
    t, p = d[name], table_path(d, name)
    fix = (f"set data.{name}.path to a local copy (json, jsonl, csv or parquet with the "
           f"upstream columns; relative paths are under data.root)")
    if p is not None:
        if not p.is_file():
            where = "" if d.root or p.is_absolute() else " (data.root is not set: data.root=DIR)"
            raise MissingResource(f"data.{name}.path={t.path}: no file at {p}{where}; {fix}")
        return read_rows(p), p.name
    if not t.hub:
        raise MissingResource(f"data.{name}: neither a path nor a hub name; {fix}")
    what = f"dataset {t.hub!r}" + (f" (config {t.config!r})" if t.config else "") + f" split {t.split!r}"
    online = hub_reachable()
    try:
        import datasets
    except ImportError:
        raise MissingResource(f"{what} for data.{name}: no local file and the `datasets` package "
                              f"is not installed (pip install 'vaa[real]'); or {fix}") from None
    try:
        with _offline(not online):
            ds = datasets.load_dataset(t.hub, t.config, split=t.split, revision=t.revision)
    except Exception as e:  # noqa: BLE001 - any failure offline means "not cached"
        if online:
            raise
        raise MissingResource(f"{what} is not available locally and the Hugging Face hub cannot "
                              f"be reached (offline); {fix}") from e
    return [dict(r) for r in ds], f"{t.hub}/{t.config or 'default'}/{t.split}"


def beavertails_slices(d) -> tuple[dict[str, list[dict]], dict]:
    """The alignment set, harmful slices, HS prompts and base corpus (vaa.data.beavertails),
    and the content report that goes into data.json."""
    return _beavertails_slices(d, read_table)


def task_splits(d, folder: str) -> dict[str, list[dict]]:
    train_name, test_name, test_split = TASK_TABLES[folder]
    rows, src = read_table(d, train_name)
    train = _uid(rows, src)
    if d.fa_test == "train_tail":  # `reference`: the last rows of train (never trained on)
        if len(train) <= d.train_tail:
            raise ValueError(f"data.train_tail={d.train_tail} leaves no train rows of {src} ({len(train)})")
        train, test = train[:-d.train_tail], train[-d.train_tail:]
    elif d.fa_test == "official":
        trows, tsrc = read_table(d, test_name)
        test = _uid(trows, tsrc)
    else:
        raise ValueError(f"data.fa_test={d.fa_test!r}; use official or train_tail")
    out = {"train": train[:d.task_rows], test_split: test[:d.fa_test_n]}
    _assert_disjoint(out, folder)
    return out


def alpaca_split(d) -> dict[str, list[dict]]:
    rows, src = read_table(d, "alpaca_eval")
    if d.task_train + d.task_test > len(rows):
        raise ValueError(f"data.task_train={d.task_train} + data.task_test={d.task_test} exceed the "
                         f"{len(rows)} AlpacaEval rows: train and test would overlap")
    return {"eval": _uid(rows, src)}


def alpaca_proxy(d, content: dict) -> dict[str, list[dict]]:
    """VAA stage 1's proxy instructions (``alpaca/train``, protocol.md §2: tatsu-lab/alpaca),
    without the rows whose instruction (alone, or with its input) is an AlpacaEval instruction:
    AlpacaEval is an attack's and the FA test's data. The count goes into ``content``."""
    try:
        rows, src = read_table(d, "alpaca")
    except MissingResource:
        s = d.alpaca_stand_in_rows
        if s.stop is not None and s.stop <= s.start:
            raise
        return alpaca_stand_in(d, content)
    try:
        reserved = keys_of(str(r["instruction"]) for r in read_table(d, "alpaca_eval")[0])
    except MissingResource:
        reserved = set()  # no AlpacaEval table: no attack or test reads it

    def shared(r: dict) -> bool:
        text = str(r.get("instruction", ""))
        return bool({content_key(text), content_key(f"{text}\n{r.get('input') or ''}")} & reserved)
    kept = [r for r in _uid(rows, src) if not shared(r)]
    content["proxy"] = {"table": "alpaca", "rows": len(kept), "dropped_as_alpaca_eval": len(rows) - len(kept)}
    return {"train": kept}


def alpaca_stand_in(d, content: dict) -> dict[str, list[dict]]:
    """Without an Alpaca table: AlpacaEval rows ``data.alpaca_stand_in_rows`` as the proxy
    (real_files: rows 300-682, after what an attack of n <= 333 reads and before the FA test
    rows). The estimate stage checks by content that no attack of this run reads them."""
    rows, src = read_table(d, "alpaca_eval")
    s = d.alpaca_stand_in_rows
    kept = _uid(rows, src)[s.start:s.stop]
    content["proxy"] = {"table": f"alpaca_eval rows {s.start}-{(s.stop or len(rows)) - 1} (stand-in)",
                        "rows": len(kept), "dropped_as_alpaca_eval": 0}
    return {"train": kept}


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)


def build_real_data(d, out: Path) -> None:
    """Write the data folder (see the module docstring) and ``data.json`` (sizes, sources)."""
    out = Path(out)
    written: dict[str, int] = {}
    slices, content = beavertails_slices(d)
    for split, rows in slices.items():
        _write(out / "beavertails" / f"{split}.jsonl", rows)
        written[f"beavertails/{split}"] = len(rows)
    builders = {**{f: (lambda f=f: task_splits(d, f)) for f in TASK_TABLES},
                "alpaca_eval": lambda: alpaca_split(d), "alpaca": lambda: alpaca_proxy(d, content)}
    for folder, build in builders.items():
        try:
            splits = build()
        except MissingResource as e:  # this task is unavailable; the others still run
            (out / folder).mkdir(parents=True, exist_ok=True)
            (out / folder / MISSING).write_text(str(e))
            continue
        for split, rows in splits.items():
            _write(out / folder / f"{split}.jsonl", rows)
            written[f"{folder}/{split}"] = len(rows)
    tables = {n: {"path": str(table_path(d, n)) if d[n].path else None, "hub": d[n].hub,
                  "config": d[n].config, "split": d[n].split, "revision": d[n].revision}
              for n in LOCAL_TABLES}
    (out / "data.json").write_text(json.dumps({"rows": written, "tables": tables,
                                               "content": content}, indent=1))


def real_data_fingerprint(d) -> dict:
    """What a real data stage's cache key adds: this module's code and the local files'
    contents (a replaced file is a new data set). Empty for the synthetic world."""
    if not is_real_data(d):
        return {}
    files = {}
    for name in LOCAL_TABLES:
        p = table_path(d, name)
        if p is not None and p.is_file():
            st = p.stat()
            h = hashlib.sha256()
            if st.st_size <= 256 << 20:
                h.update(p.read_bytes())
            else:  # very large: size and time, not a full read at every key computation
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            files[name] = h.hexdigest()[:16]
    code = hashlib.sha256()
    for module in DATA_CODE:  # the modules that decide which rows are written
        code.update((Path(__file__).parent / module).read_bytes())
    return {"data_code": code.hexdigest()[:16], "files": files}
