"""Vulnerability groups (vaa.data.groups), the groups file (vaa.data.groups_file) and
group-aware batches (vaa.data.group_stream)."""

from __future__ import annotations

import hashlib
import json
import random

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vaa.data.encode import TrainCollator
from vaa.data.formats import Example
from vaa.data.group_stream import GroupDataModule, GroupStream
from vaa.data.groups import assign_groups, example_uid, forgot_num, group_counts
from vaa.data.groups_file import groups_for, import_reference_indices, read_groups, write_groups
from vaa.models.tokenizer import build_word_tokenizer

# ---------------------------------------------------------------------------- helpers


def pairs(n: int, tag: str = "") -> list[tuple[str, str]]:
    return [(f"how do i do thing {i}{tag} ?", f"here is a safe answer {i}{tag} .") for i in range(n)]


# ---------------------------------------------------------------------------- uid


def test_uid_recipe_and_unambiguous():
    u = example_uid("a b", "c")
    assert u == hashlib.sha1(json.dumps(["a b", "c"], separators=(",", ":")).encode()).hexdigest()
    assert len(u) == 40 and u == example_uid("a b", "c")
    assert u != example_uid("a", "b c")  # no separator collision
    assert example_uid("é", "x") == hashlib.sha1('["é","x"]'.encode()).hexdigest()


# ---------------------------------------------------------------------------- forgot_num


@pytest.mark.parametrize("flags, first, trans", [
    ([0, 0, 0, 0], 0, 0),
    ([0, 1, 1, 0], 2, 1),
    ([0, 1, 0, 1], 2, 2),
    ([1, 1, 1, 1], 0, 0),
    ([1, 0, 1, 0], 0, 1),   # harmful at t=0: never vulnerable under first_vs_t0, can be under transitions
    ([1, 0, 1, 1], 0, 1),
    ([0], 0, 0),
    ([True, False, True], 0, 1),
])
def test_forgot_num_definitions(flags, first, trans):
    assert forgot_num(flags, "first_vs_t0") == first
    assert forgot_num(flags, "transitions") == trans


def test_forgot_num_t1_definitions_coincide():
    for flags in ([0, 0], [0, 1], [1, 0], [1, 1]):
        assert forgot_num(flags, "first_vs_t0") == forgot_num(flags, "transitions")


def test_forgot_num_bad_input():
    with pytest.raises(ValueError, match="first_vs_t0.*transitions"):
        forgot_num([0, 1], "paper")
    with pytest.raises(ValueError, match="empty"):
        forgot_num([], "transitions")
    with pytest.raises(ValueError, match="t=1"):
        forgot_num([0, 2], "transitions")
    with pytest.raises(ValueError, match="t=1"):
        forgot_num([0, 0.5], "transitions")


def test_assign_groups_union_vs_intersection():
    run_a = [[0, 1, 0], [0, 0, 0], [0, 1, 1], [1, 1, 1]]
    run_b = [[0, 0, 0], [0, 0, 1], [0, 0, 1], [1, 0, 1]]
    g_u, f = assign_groups([run_a, run_b], "first_vs_t0", "union")
    g_i, _ = assign_groups([run_a, run_b], "first_vs_t0", "intersection")
    assert f == [[1, 0, 2, 0], [0, 1, 1, 0]]
    assert g_u == [1, 1, 1, 0] and g_i == [0, 0, 1, 0]
    # transitions sees example 3 of run b as a 0→1 flip
    assert assign_groups([run_a, run_b], "transitions", "union")[0] == [1, 1, 1, 1]
    assert assign_groups([run_a], "transitions")[0] == [1, 0, 1, 0]  # one run: union = intersection
    with pytest.raises(ValueError, match="union.*intersection"):
        assign_groups([run_a], "first_vs_t0", "majority")
    with pytest.raises(ValueError, match="run 1"):
        assign_groups([run_a, run_b[:3]], "first_vs_t0")
    with pytest.raises(ValueError, match="run 0, example 1"):
        assign_groups([[[0, 1], [0, 3]]], "first_vs_t0")


def test_group_counts():
    assert group_counts([0, 1, 1, 0, 0]) == {0: 3, 1: 2}
    assert group_counts([0, 0]) == {0: 2, 1: 0}


# ---------------------------------------------------------------------------- the file


def test_write_read_round_trip_one_run(tmp_path):
    ex = pairs(5)
    flags = [[0, 1, 0], [0, 0, 0], [1, 1, 1], [0, 0, 1], [1, 0, 1]]
    groups, forgot = assign_groups([flags], "transitions")
    meta = {"proxy": "alpaca", "p": 0.1, "n": 1000, "lr": 1e-5, "epochs": 5, "judge": "exact",
            "definition": "transitions", "aggregate": "union", "model": "tiny"}
    path = tmp_path / "sub" / "groups.jsonl"
    write_groups(path, ex, groups, forgot, [flags], meta)
    rows = read_groups(path)
    assert [r["index"] for r in rows] == list(range(5))
    assert [r["uid"] for r in rows] == [example_uid(*e) for e in ex]
    assert [r["group"] for r in rows] == groups == [1, 0, 0, 1, 1]
    assert [r["forgot_num"] for r in rows] == forgot[0]
    assert [r["flags"] for r in rows] == flags
    assert all(r["meta"] == meta for r in rows)
    assert groups_for(ex, rows) == groups
    assert not list(tmp_path.glob("sub/.*tmp"))  # atomic write leaves no temp file


def test_write_several_runs(tmp_path):
    ex = pairs(3)
    runs = [[[0, 1], [0, 0], [0, 1]], [[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]]
    groups, forgot = assign_groups(runs, "first_vs_t0", "union")
    write_groups(tmp_path / "g.jsonl", ex, groups, forgot, runs, {"aggregate": "union"})
    rows = read_groups(tmp_path / "g.jsonl")
    assert rows[0]["flags"] == [[0, 1], [0, 1, 1, 1]]
    assert rows[0]["forgot_num"] == 3 and rows[0]["forgot_num_per_run"] == [1, 3]
    assert [r["group"] for r in rows] == [1, 0, 1]


def test_read_groups_errors_name_file_and_line(tmp_path):
    p = tmp_path / "groups.jsonl"
    good = json.dumps({"uid": "ab", "index": 0, "group": 1})
    p.write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"groups\.jsonl, line 2: not valid JSON"):
        read_groups(p)
    p.write_text(good + "\n\n" + json.dumps({"uid": "cd", "group": 0}) + "\n")
    with pytest.raises(ValueError, match=r"groups\.jsonl, line 3: missing field\(s\) \['index'\]"):
        read_groups(p)
    p.write_text(json.dumps({"uid": "cd", "index": 0, "group": 2}) + "\n")
    with pytest.raises(ValueError, match="line 1: 'group'"):
        read_groups(p)
    p.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        read_groups(p)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_groups(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------- joining


def test_groups_for_joins_on_uid_with_shuffled_rows(tmp_path):
    ex = pairs(50)
    groups = [random.Random(0).randint(0, 1) for _ in ex]
    write_groups(tmp_path / "g.jsonl", ex, groups)
    rows = read_groups(tmp_path / "g.jsonl")
    random.Random(1).shuffle(rows)
    assert groups_for(ex, rows) == groups


def test_reordered_alignment_set_follows_content(tmp_path):
    ex = pairs(40)
    groups = [int(i % 3 == 0) for i in range(40)]
    write_groups(tmp_path / "g.jsonl", ex, groups)
    rows = read_groups(tmp_path / "g.jsonl")
    order = list(range(40))
    random.Random(2).shuffle(order)
    reordered = [ex[i] for i in order]
    # every example keeps the group of its content, not of its new position
    assert groups_for(reordered, rows) == [groups[i] for i in order]
    with pytest.raises(ValueError, match="reordered"):
        groups_for(reordered, rows, strict_order=True)
    assert groups_for(ex, rows, strict_order=True) == groups


def test_groups_for_mismatch_errors(tmp_path):
    ex = pairs(10)
    write_groups(tmp_path / "g.jsonl", ex, [0, 1] * 5)
    rows = read_groups(tmp_path / "g.jsonl")
    other = ex[:4] + [("a new prompt", "a new answer")] + ex[5:]
    uid = example_uid("a new prompt", "a new answer")
    with pytest.raises(ValueError, match=rf"example 4 \(uid {uid}\).*different alignment set.*re-run"):
        groups_for(other, rows)
    # a row that matches no example (the set shrank): wrong file
    with pytest.raises(ValueError, match=rf"1 row\(s\).*index 9, uid {example_uid(*ex[9])}.*wrong file"):
        groups_for(ex[:9], rows)
    with pytest.raises(ValueError, match=r"my\.jsonl"):
        groups_for(other, rows, source="my.jsonl")


def test_groups_for_duplicate_pairs():
    ex = [("p", "r"), ("q", "s"), ("p", "r")]
    rows = import_reference_indices([2], ex)
    assert groups_for(ex, rows) == [0, 0, 1]
    with pytest.raises(ValueError, match="example 2 .*already used"):
        groups_for(ex, rows[:2])


# ---------------------------------------------------------------------------- reference import


def test_reference_import_counts_and_checksum(tmp_path):
    ex = pairs(2000)
    idx = sorted(random.Random(3).sample(range(2, 1997), 742))
    path = tmp_path / "vulnerable.json"
    path.write_text(json.dumps(idx))
    rows = import_reference_indices(path, ex)
    groups = groups_for(ex, rows)
    assert group_counts(groups) == {0: 1258, 1: 742}
    assert [i for i, g in enumerate(groups) if g] == idx
    r = rows[idx[0]]
    assert r["uid"] == example_uid(*ex[idx[0]]) and r["forgot_num"] is None and r["flags"] == []
    assert r["meta"]["source"] == "reference_indices"
    want = hashlib.sha256(json.dumps(idx, separators=(",", ":")).encode()).hexdigest()
    assert r["meta"]["checksum"] == want
    # the checksum is of the canonical sorted list: the file's order does not change it
    shuffled = list(idx)
    random.Random(4).shuffle(shuffled)
    assert import_reference_indices(shuffled, ex)[0]["meta"]["checksum"] == want
    # round trip through groups.jsonl
    from vaa.data.groups_file import write_rows
    write_rows(tmp_path / "g.jsonl", rows)
    assert groups_for(ex, read_groups(tmp_path / "g.jsonl")) == groups
    # the imported rows follow the content when the set is later reordered
    rev = ex[::-1]
    assert groups_for(rev, rows) == groups[::-1]


@pytest.mark.parametrize("bad, match", [
    ([1, 2, 10], r"index 10 \(entry 2\) is out of range \[0, 10\)"),
    ([-1], "index -1"),
    ([1, 3, 1], "index 1 appears more than once"),
    ([1, "2"], r"entry 1 is '2'"),
    ([1, 2.0], r"entry 1 is 2\.0"),
    ([True], "entry 0 is True"),
    ({"a": 1}, "expected a JSON list"),
])
def test_reference_import_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        import_reference_indices(bad, pairs(10))


def test_reference_import_bad_file(tmp_path):
    p = tmp_path / "v.json"
    p.write_text("[1, 2,")
    with pytest.raises(ValueError, match=r"v\.json: not valid JSON"):
        import_reference_indices(p, pairs(10))
    p.write_text("[1, 20]")
    with pytest.raises(ValueError, match=r"v\.json: index 20"):
        import_reference_indices(str(p), pairs(10))


# ---------------------------------------------------------------------------- GroupStream


def id_rows(n: int, start: int = 1) -> list[dict]:
    """Rows whose single token is their id (pad 0 never collides)."""
    return [{"input_ids": [i], "labels": [i]} for i in range(start, start + n)]


def ids(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def make_stream(seed=0, rank=0, n0=10, n1=7, bs=3) -> GroupStream:
    return GroupStream({0: id_rows(n0, 1), 1: id_rows(n1, 1001)}, bs, TrainCollator(0), seed, rank)


def test_stream_single_group_full_pass_partial_batch_and_restart():
    s = make_stream()
    passes = []
    for _ in range(3):
        sizes, seen = [], []
        for _ in range(3):  # 7 rows, bs 3: 3, 3, 1 — the last partial batch is kept
            b = s.next_batch(1)
            sizes.append(len(ids(b)))
            seen += ids(b)
        assert sizes == [3, 3, 1]
        assert sorted(seen) == list(range(1001, 1008))  # every row exactly once per pass
        passes.append(seen)
    assert passes[0] != passes[1] != passes[2]  # a new permutation per pass
    for _ in range(5):
        assert all(i <= 10 for i in ids(s.next_batch(0)))  # group 0's rows only
    b = s.next_batch(0)
    assert set(b) == {"input_ids", "labels", "attention_mask"}


def test_stream_groups_are_independent():
    a, b = make_stream(), make_stream()
    for _ in range(4):
        a.next_batch(1)
    assert [ids(a.next_batch(0)) for _ in range(4)] == [ids(b.next_batch(0)) for _ in range(4)]


def test_stream_state_dict_resumes_identically():
    a = make_stream(seed=5)
    rng = random.Random(0)
    for _ in range(11):
        a.next_batch(rng.randint(0, 1))
    state = a.state_dict()
    state = torch.load(_roundtrip(state), weights_only=True)  # survives a checkpoint file
    b = make_stream(seed=999)  # another seed: everything comes from the state
    b.load_state_dict(state)
    for _ in range(20):
        g = rng.randint(0, 1)
        x, y = a.next_batch(g), b.next_batch(g)
        for k in x:
            assert torch.equal(x[k], y[k])


def _roundtrip(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_stream_state_mismatch():
    s = make_stream()
    with pytest.raises(ValueError, match="group sizes"):
        make_stream(n1=8).load_state_dict(s.state_dict())


def test_stream_seed_and_rank_change_order():
    def order(**kw):
        s = make_stream(**kw)
        return [ids(s.next_batch(0)) for _ in range(4)]
    assert order(seed=0) == order(seed=0)
    assert order(seed=0) != order(seed=1)
    assert order(rank=0) != order(rank=1)


def test_stream_empty_group():
    # allowed at construction (nothing vulnerable found); drawing from it fails loudly
    s = GroupStream.from_groups(id_rows(4), [0, 0, 0, 0], 2, TrainCollator(0), 0)
    assert s.sizes() == [4, 0] and len(ids(s.next_batch(0))) == 2
    with pytest.raises(ValueError, match=r"group 1 \(vulnerable\) has no examples.*different grouping"):
        s.next_batch(1)
    s.load_state_dict(s.state_dict())  # the state of an empty group round-trips
    with pytest.raises(ValueError, match="no examples in any group"):
        GroupStream({}, 2, TrainCollator(0), 0)
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        GroupStream.from_groups(id_rows(2), [0, 2], 2, TrainCollator(0), 0)


# ---------------------------------------------------------------------------- GroupDataModule


@pytest.fixture(scope="module")
def world():
    ex = [Example("answer the question .", f"question number w{i} ?", f"answer w{i} .") for i in range(23)]
    tok = build_word_tokenizer([e.instruction + " " + e.input + " " + e.output for e in ex])
    groups = [int(i % 3 == 0) for i in range(23)]  # 8 vulnerable, 15 invulnerable
    return ex, tok, groups


def make_dm(world, **kw):
    ex, tok, groups = world
    args = dict(batch_size=4, seed=0, template="alpaca", max_length=64)
    args.update(kw)
    return GroupDataModule(ex, groups, tok, **args)


def test_datamodule(world):
    ex, tok, groups = world
    dm = make_dm(world)
    assert dm.steps_per_epoch() == 6  # ceil(23 / 4) over all examples
    assert dm.group_sizes() == [15, 8]
    steps = list(dm.train_dataloader())
    assert len(steps) == 6 and len(dm.train_dataloader()) == 6
    # batches of the vulnerable group carry only the vulnerable examples' words
    vul_words = {f"w{i}" for i, g in enumerate(groups) if g}
    seen = set()
    for _ in range(2):  # one pass: 4 + 4
        b = dm.stream.next_batch(1)
        for row in b["input_ids"]:
            words = {w for w in tok.convert_ids_to_tokens(row.tolist()) if w.startswith("w")}
            assert len(words) == 1 and words <= vul_words
            seen |= words
    assert seen == vul_words
    with pytest.raises(ValueError, match="23 alignment examples"):
        GroupDataModule(ex, groups[:5], tok, batch_size=4, seed=0)


def test_datamodule_state_dict_before_and_after_setup(world):
    a = make_dm(world)
    a.setup()
    for g in (0, 1, 1, 0, 1):
        a.stream.next_batch(g)
    state = a.state_dict()
    b = make_dm(world, seed=7)
    b.load_state_dict(state)  # before setup: applied when the stream is built
    b.setup()
    for g in (1, 1, 0, 1, 0, 0):
        assert torch.equal(a.stream.next_batch(g)["input_ids"], b.stream.next_batch(g)["input_ids"])


class _Probe(L.LightningModule):
    """Draws a batch from the stream inside the step, as VAA does; records what it drew."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.drawn: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        group = int(self.global_step % 3 == 0)
        b = self.trainer.datamodule.stream.next_batch(group)
        self.drawn.append(b["input_ids"].sum(1).tolist())
        return (self.w * b["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(world, tmp_path, max_steps, ckpt_path=None):
    dm, probe = make_dm(world, batch_size=3), _Probe()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=-1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0,
                                                   every_n_train_steps=4)])
    trainer.fit(probe, datamodule=dm, ckpt_path=ckpt_path)
    return probe.drawn


@pytest.mark.filterwarnings("ignore")
def test_lightning_checkpoint_restores_stream(world, tmp_path):
    full = _fit(world, tmp_path / "a", 12)           # 8 steps/epoch: crosses an epoch boundary
    first = _fit(world, tmp_path / "b", 4)           # stops mid-epoch, checkpoint at step 4
    rest = _fit(world, tmp_path / "c", 12, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert len(full) == 12 and first == full[:4]
    assert rest == full[4:]
