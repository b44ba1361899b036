"""BeaverTails slices of the real data stage (protocol.md §3.1-3.2, §3.4): the alignment set,
the harmful slices (the attack's poison, VAA stage 1's proxy poison, Booster / RepNoise's
harmful set), the HS prompts and a tiny model's base corpus.

Slices count rows of one kind in table order: the alignment pool (``data.align_source``),
unsafe rows for the harmful slices and the HS prompts. They are disjoint by uid (position)
and by content: a row of a training slice whose prompt (normalised, vaa.data.content) is
also an HS prompt is removed (``data.hs_overlap``: ``redraw`` skips it and draws the next row,
so the alignment set keeps its size; the harmful slices share one pool and always lose the
row; ``drop`` leaves every slice that many rows short), and the counts go into
``data.json`` (``content.dropped``). BeaverTails repeats prompts, and the local 30k_test file
holds 97 prompts in both its safe and unsafe rows.

Alignment pools (``data.align_source``):

- ``beavertails``: the ``is_safe`` rows (``reference``: the first 2,000 of 30k_train);
- ``refusals``: the refusal-enriched table (``data.refusals``; output = its refusal answer);
- ``beavertails_refusals``: the ``is_safe`` rows whose response is itself a refusal by the
  keyword judge's list ``data.refusal_keywords`` (whole phrases, vaa.eval.judges), i.e.
  harmful prompts answered by a refusal: alignment data a keyword judge can see.
"""

from __future__ import annotations

from typing import Callable

from vaa.data.content import assert_no_shared_text, content_key, keys_of, without_reserved

HS_OVERLAP = ("redraw", "drop")
# slice name -> data.* key of its rows; the pool each one draws from is named in _pools()
TRAINING_SLICES = {"align": "align_rows", "harmful": "harmful_rows", "proxy_harmful": "proxy_rows",
                   "align_harmful": "align_harmful_rows", "base": "base_rows"}


def is_safe(row: dict, src: str, i: int) -> bool:
    v = row.get("is_safe")
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    if not isinstance(v, bool):
        raise ValueError(f"{src}, row {i}: 'is_safe' must be true/false, got {v!r}")
    return v


def refusal_row(row: dict, src: str, i: int) -> dict:
    """A refusal-enriched row as a BeaverTails alignment row: output = the refusal's answer
    (the file stores "Question: …\\nAnswer: …"; protocol.md §2 says verify on load)."""
    for c in ("prompt", "refusal"):
        if c not in row:
            raise ValueError(f"{src}, row {i}: missing column {c!r} (refusal file needs prompt, refusal)")
    answer = row["refusal"].split("\nAnswer:", 1)[-1].strip()
    if not answer:
        raise ValueError(f"{src}, row {i}: empty refusal answer")
    return {"prompt": row["prompt"], "response": answer, "category": {}, "is_safe": True}


def with_uids(rows: list[dict], src: str) -> list[dict]:
    return [{"uid": f"{src}#{i}", **r} for i, r in enumerate(rows)]


def assert_disjoint(named: dict[str, list[dict]], what: str) -> None:
    seen: dict[str, str] = {}
    for name, rows in named.items():
        for r in rows:
            if r["uid"] in seen and seen[r["uid"]] != name:
                raise ValueError(f"{what}: row {r['uid']} is in both {seen[r['uid']]} and {name}; "
                                 f"make the data.* slices disjoint")
            seen[r["uid"]] = name


def _safe_rows(d, safe: list[dict], read_table) -> list[dict]:
    return safe


def _refusal_table(d, safe: list[dict], read_table) -> list[dict]:
    ref, rsrc = read_table(d, "refusals")
    return [{"uid": f"{rsrc}#{i}", **refusal_row(r, rsrc, i)} for i, r in enumerate(ref)]


def _keyword_refusals(d, safe: list[dict], read_table) -> list[dict]:
    from vaa.eval.judges import KeywordJudge

    judge = KeywordJudge(d.refusal_keywords)
    return [r for r in safe if judge.is_refusal(str(r["response"]))]


ALIGN_POOLS: dict[str, Callable] = {"beavertails": _safe_rows, "refusals": _refusal_table,
                                    "beavertails_refusals": _keyword_refusals}


def _prompt(r: dict) -> str:
    return str(r["prompt"])


def hs_prompts(d, read_table) -> list[dict]:
    """The HS prompts: ``data.hs_rows`` of the unsafe rows of ``beavertails_test``."""
    test_rows, tsrc = read_table(d, "beavertails_test")
    test = [r for i, r in enumerate(with_uids(test_rows, tsrc)) if not is_safe(r, tsrc, i)]
    if d.hs_dedup:
        firsts: dict[str, dict] = {}
        for r in test:
            firsts.setdefault(content_key(r["prompt"]), r)
        test = list(firsts.values())
    return test[d.hs_rows.start:d.hs_rows.stop]


def beavertails_slices(d, read_table) -> tuple[dict[str, list[dict]], dict]:
    """(slices, content report) — see the module docstring. ``read_table(d, name)`` returns
    (rows, source id) of one upstream table (vaa.data.hub.read_table)."""
    if d.align_source not in ALIGN_POOLS:
        raise ValueError(f"data.align_source={d.align_source!r}; use one of {sorted(ALIGN_POOLS)}")
    if d.hs_overlap not in HS_OVERLAP:
        raise ValueError(f"data.hs_overlap={d.hs_overlap!r}; use one of {HS_OVERLAP}")
    rows, src = read_table(d, "beavertails_train")
    train = with_uids(rows, src)
    safe = [r for i, r in enumerate(train) if is_safe(r, src, i)]
    unsafe = [r for i, r in enumerate(train) if not is_safe(r, src, i)]
    pools = {"align": ALIGN_POOLS[d.align_source](d, safe, read_table), "harmful": unsafe,
             "proxy_harmful": unsafe, "align_harmful": unsafe, "base": train}
    test = hs_prompts(d, read_table)
    reserved = keys_of(r["prompt"] for r in test)
    out, dropped = {}, {}
    for name, key in TRAINING_SLICES.items():
        s = d[key]  # only the alignment pool is read by one slice alone: it can be re-drawn
        redraw = d.hs_overlap == "redraw" and name == "align"
        out[name], dropped[name] = without_reserved(pools[name], _prompt, reserved, s.start, s.stop, redraw)
    out["test"] = test
    for name, key in (("align", "align_rows"), ("harmful", "harmful_rows"), ("test", "hs_rows")):
        if not out[name]:
            raise ValueError(f"data.{key} selects no rows (check the slice, data.align_source="
                             f"{d.align_source} and the table's safe/unsafe rows)")
    assert_disjoint(out, "BeaverTails slices")
    assert_no_shared_text("the HS prompts", reserved, {k: out[k] for k in TRAINING_SLICES}, _prompt,
                          "BeaverTails slices")
    report = {"key": "prompt text, NFKC + case folded + whitespace collapsed",
              "hs_overlap": d.hs_overlap, "dropped": dropped, "align_source": d.align_source,
              "align_pool": len(pools["align"])}
    return {k: v for k, v in out.items() if v}, report
