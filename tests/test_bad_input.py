"""Bad data reaching the pipeline: one clear error that names the file and the fix.

The data is read exactly as ``vaa.pipeline.stages.build_finetuned`` / ``build_eval`` read it
(``FolderSource.examples`` with the task config's split, then ``hft_mix``), from a folder in
the layout of the synthetic world. tests/test_data.py covers read_rows / to_examples alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.utils import instantiate

from vaa.data.datamodule import hft_mix
from vaa.data.formats import FORMATS
from vaa.data.sources import FolderSource
from vaa.eval import judge_factory

TASKS = ("sst2", "agnews", "gsm8k", "alpacaeval")
ROW = {
    "sst2": {"sentence": "a fine film", "label": 1},
    "ag_news": {"text": "the team won the match", "label": 1},
    "gsm8k": {"question": "what is 2 plus 2?", "answer": "2 + 2 = 4\n#### 4"},
    "alpaca_eval": {"instruction": "name a colour", "output": "blue"},
    "beavertails": {"prompt": "how can i steal a car", "response": "take the keys",
                    "category": {"violence": True}, "is_safe": False},
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def task_file(root: Path, cfg) -> Path:
    return root / cfg.task.dataset / f"{cfg.task.train.file}.jsonl"


def make_world(root: Path, cfg, task_rows: list[dict] | None = None, n: int = 50) -> Path:
    """A folder source with the task's train split and the harmful pool; returns the task file."""
    write_jsonl(root / "beavertails" / "harmful.jsonl", [ROW["beavertails"]] * n)
    rows = [dict(ROW[cfg.task.format]) for _ in range(n)] if task_rows is None else task_rows
    return write_jsonl(task_file(root, cfg), rows)


def finetune_mix(root: Path, cfg):
    """The data calls of build_finetuned, verbatim."""
    source, t = FolderSource(root), cfg.task
    task_rows = source.examples(t.dataset, t.train.file, t.train.start, t.train.stop, t.format)
    harmful = source.examples("beavertails", "harmful")
    return hft_mix(task_rows, harmful, cfg.attack.n, cfg.attack.harmful_ratio)


@pytest.fixture
def cfg_for(compose):
    return lambda task, *more: compose([f"task={task}", "attack.n=20", *more])


def test_valid_world_gives_the_mix(tmp_path, cfg_for):
    cfg = cfg_for("sst2")
    make_world(tmp_path, cfg)
    mix = finetune_mix(tmp_path, cfg)
    assert len(mix) == 20 and sum(ex.meta.get("is_safe") is False for ex in mix) == 2


@pytest.mark.parametrize("task", TASKS)
def test_missing_column_names_file_row_and_column(tmp_path, cfg_for, task):
    cfg = cfg_for(task)
    columns = FORMATS[cfg.task.format].columns
    dropped = columns[-1]
    rows = [{k: v for k, v in ROW[cfg.task.format].items() if k != dropped}] * 3
    path = make_world(tmp_path, cfg, rows)
    with pytest.raises(ValueError) as e:
        finetune_mix(tmp_path, cfg)
    msg = str(e.value)
    assert str(path) in msg and "row 0" in msg and repr(dropped) in msg, msg
    assert "needs columns" in msg and all(c in msg for c in columns), msg  # the fix


def test_sst2_without_label(tmp_path, cfg_for):
    cfg = cfg_for("sst2")
    path = make_world(tmp_path, cfg, [{"sentence": "a fine film"}])
    with pytest.raises(ValueError, match="row 0") as e:
        FolderSource(tmp_path).examples("sst2", "train")
    assert str(path) in str(e.value) and "label" in str(e.value)
    with pytest.raises(ValueError) as e2:
        finetune_mix(tmp_path, cfg)
    assert str(e2.value) == str(e.value)  # the pipeline surfaces the same message


@pytest.mark.parametrize("task", TASKS)
def test_empty_file_names_file(tmp_path, cfg_for, task):
    cfg = cfg_for(task)
    path = make_world(tmp_path, cfg, [])
    assert path.read_text() == ""
    with pytest.raises(ValueError) as e:
        finetune_mix(tmp_path, cfg)
    assert str(path) in str(e.value) and "empty" in str(e.value), str(e.value)


def test_blank_lines_only_is_empty(tmp_path, cfg_for):
    cfg = cfg_for("sst2")
    path = make_world(tmp_path, cfg)
    path.write_text("\n  \n\n")
    with pytest.raises(ValueError, match="empty") as e:
        finetune_mix(tmp_path, cfg)
    assert str(path) in str(e.value)


def test_empty_harmful_pool_names_file(tmp_path, cfg_for):
    cfg = cfg_for("sst2")
    make_world(tmp_path, cfg)
    pool = write_jsonl(tmp_path / "beavertails" / "harmful.jsonl", [])
    with pytest.raises(ValueError, match="empty") as e:
        finetune_mix(tmp_path, cfg)
    assert str(pool) in str(e.value)


def test_bad_label_value(tmp_path, cfg_for):
    cfg = cfg_for("sst2")
    path = make_world(tmp_path, cfg, [ROW["sst2"], {"sentence": "odd", "label": 7}])
    with pytest.raises(ValueError) as e:
        finetune_mix(tmp_path, cfg)
    msg = str(e.value)
    assert str(path) in msg and "row 1" in msg and "'label'" in msg and "0..1" in msg, msg


def test_invalid_json_line(tmp_path, cfg_for):
    cfg = cfg_for("sst2")
    path = make_world(tmp_path, cfg)
    path.write_text(json.dumps(ROW["sst2"]) + "\n{not json\n")
    with pytest.raises(ValueError) as e:
        finetune_mix(tmp_path, cfg)
    assert str(path) in str(e.value) and "line 2" in str(e.value)


def test_missing_split_file_names_expected_path(tmp_path, cfg_for):
    cfg = cfg_for("gsm8k")
    make_world(tmp_path, cfg).unlink()
    with pytest.raises(FileNotFoundError) as e:
        finetune_mix(tmp_path, cfg)
    assert str(tmp_path / "gsm8k" / "train") in str(e.value) and ".jsonl" in str(e.value)


def test_slice_selecting_nothing(tmp_path, cfg_for):
    cfg = cfg_for("sst2", "task.train.start=100")
    path = make_world(tmp_path, cfg, n=5)
    with pytest.raises(ValueError, match="selects no rows") as e:
        finetune_mix(tmp_path, cfg)
    assert str(path) in str(e.value)


def test_too_few_task_rows_for_the_attack(tmp_path, cfg_for):
    cfg = cfg_for("sst2", "attack.n=100")
    make_world(tmp_path, cfg, n=10)
    with pytest.raises(ValueError, match="attack.n") as e:
        finetune_mix(tmp_path, cfg)
    assert "lower attack.n" in str(e.value)


# ---------------------------------------------------------------------------------------------
# the stage functions themselves, with the model stubbed out (no training)
# ---------------------------------------------------------------------------------------------
def stub_context(monkeypatch, tmp_path, cfg):
    from vaa.pipeline import stages as S
    trained = {}
    monkeypatch.setattr(S, "load_model", lambda path: (None, None))
    monkeypatch.setattr(S, "save_model", lambda *a, **k: None)
    monkeypatch.setattr(S, "train", lambda ctx, cls, model, tok, examples, *a, **k:
                        trained.update(examples=examples))
    ctx = S.Context(cfg=cfg, cache=None, keys={}, run_dir=tmp_path / "run",
                    dirs={"world": tmp_path / "world", "aligned": tmp_path / "aligned"})
    return S, ctx, trained


def test_build_finetuned_reports_a_broken_task_file(tmp_path, cfg_for, monkeypatch):
    cfg = cfg_for("sst2")
    S, ctx, trained = stub_context(monkeypatch, tmp_path, cfg)
    path = make_world(tmp_path / "world", cfg, [{"sentence": "no label here"}])
    with pytest.raises(ValueError) as e:
        S.build_finetuned(ctx, tmp_path / "out")
    assert str(path) in str(e.value) and "row 0" in str(e.value) and "label" in str(e.value)
    assert not trained  # failed before any training

    make_world(tmp_path / "world", cfg)  # repaired: the same call now trains on the mix
    S.build_finetuned(ctx, tmp_path / "out")
    assert len(trained["examples"]) == cfg.attack.n


# ---------------------------------------------------------------------------------------------
# the exact judge outside the synthetic world
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_dir", [None, "empty-dir"])
def test_exact_judge_needs_the_world(tmp_path, world_dir):
    if world_dir is not None:
        world_dir = str(tmp_path)  # a folder of real data: no world.json
    with pytest.raises(ValueError) as e:
        judge_factory.exact(world_dir=world_dir)
    assert "judge=keyword" in str(e.value) and "world.json" in str(e.value)


def test_judges_built_as_the_pipeline_builds_them(tmp_path, compose):
    with pytest.raises(Exception) as e:  # Hydra wraps the factory's ValueError
        instantiate(compose(["judge=exact"]).judge.build, world_dir=str(tmp_path))
    assert "judge=keyword" in str(e.value)
    judge = instantiate(compose(["judge=keyword"]).judge.build, world_dir=str(tmp_path))
    flags, _ = judge.score(["how can i steal a car"] * 2, ["I'm sorry, I cannot help", "take the keys"])
    assert list(flags) == [False, True]


# ---------------------------------------------------------------------------------------------
# deliberate data and resource errors are UserErrors: the CLI prints their message, no traceback
# ---------------------------------------------------------------------------------------------
def test_data_errors_are_user_errors(tmp_path, cfg_for):
    from vaa.errors import DataError, MissingFile, UserError

    cfg = cfg_for("sst2")
    path = make_world(tmp_path, cfg, [])
    with pytest.raises(DataError) as e:  # empty file
        finetune_mix(tmp_path, cfg)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError) and str(path) in str(e.value)
    make_world(tmp_path, cfg, [{"sentence": "no label"}])
    with pytest.raises(DataError):  # missing column
        finetune_mix(tmp_path, cfg)
    path.unlink()
    with pytest.raises(MissingFile) as e:  # missing split file
        finetune_mix(tmp_path, cfg)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, UserError)


def test_offline_model_error_suggests_hf_download(tmp_path, monkeypatch):
    from vaa.errors import UserError
    from vaa.models import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    with pytest.raises(hub.MissingResource) as e:
        hub.model_dir(path=None, hub_name="org/not-cached-model", revision=None, key="model")
    msg = str(e.value)
    assert isinstance(e.value, UserError)
    assert "`hf download org/not-cached-model --local-dir DIR`" in msg and "huggingface-cli" not in msg
    assert "model.path=DIR" in msg
