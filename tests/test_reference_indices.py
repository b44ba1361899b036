"""The reference's index list is mapped only onto the reference's alignment set (issue 12 item
5): a reordered set (positions out of table order, or a different align_checksum) or one the
data stage removed rows from is refused, naming the file, the rows and the override."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from hf_fixtures import write_jsonl
from vaa.data.groups_file import groups_for
from vaa.data.reference_indices import (align_checksum, alignment_provenance, import_reference_indices,
                                        verify_reference_alignment)
from vaa.data.sources import FolderSource
from vaa.pipeline.stages import load_groups


def pairs(n):
    return [(f"prompt {i}", f"response {i}") for i in range(n)]


@pytest.fixture
def index_file(tmp_path):
    p = tmp_path / "vulnerable.json"
    p.write_text(json.dumps([1, 4]))
    return p


def test_reversed_alignment_set_is_refused_by_its_checksum(index_file):
    ex = pairs(6)
    expected = align_checksum(ex)
    rows = import_reference_indices(index_file, ex, expected_checksum=expected)
    assert groups_for(ex, rows) == [0, 1, 0, 0, 1, 0] and rows[0]["meta"]["align_checksum"] == expected
    with pytest.raises(ValueError, match=rf"{index_file}.*align_checksum .* but dro.reference_align_checksum"
                                         r".*dro.reference_check=false"):
        import_reference_indices(index_file, ex[::-1], expected_checksum=expected)
    # knowingly: the old behaviour (other examples selected), only when asked for
    rows = import_reference_indices(index_file, ex[::-1], expected_checksum=expected, check=False)
    assert groups_for(ex[::-1], rows) == [0, 1, 0, 0, 1, 0]


def test_reversed_alignment_set_is_refused_by_its_table_positions(index_file):
    ex = pairs(6)
    with pytest.raises(ValueError, match=r"alignment rows 0 and 1 are table rows 5 and 4: .*reordered"):
        import_reference_indices(index_file, ex[::-1], positions=[5, 4, 3, 2, 1, 0])
    # rows of a mixed table are in table order with gaps (safe rows among unsafe ones): fine
    import_reference_indices(index_file, ex, positions=[0, 2, 3, 7, 8, 11])
    with pytest.raises(ValueError, match="removed 1 alignment row"):
        import_reference_indices(index_file, ex, positions=[0, 2, 3, 7, 8, 11], dropped=1)
    verify_reference_alignment("x", ex, positions=[None] * 6)  # no positions known: no order check


def _data_folder(root, align_rows, dropped=0):
    write_jsonl(root / "beavertails" / "align.jsonl", align_rows)
    (root / "data.json").write_text(json.dumps({"content": {"dropped": {"align": dropped}}}))
    return FolderSource(root)


def _ctx(source, groups_file, **dro):
    cfg = OmegaConf.create({"dro": {"groups_file": str(groups_file), "reference_check": True,
                                    "reference_align_checksum": None, **dro}})
    return SimpleNamespace(cfg=cfg, source=source, dirs={})


def test_the_pipeline_refuses_a_reversed_alignment_set(tmp_path, index_file):
    rows = [{"uid": f"bt.jsonl#{2 * i}", "prompt": f"prompt {i}", "response": f"response {i}",
             "category": {}, "is_safe": True} for i in range(6)]
    source = _data_folder(tmp_path / "ok", rows)
    ex = source.examples("beavertails", "align")
    assert load_groups(_ctx(source, index_file), ex) == [0, 1, 0, 0, 1, 0]
    assert alignment_provenance(source.root, 6) == {"positions": [0, 2, 4, 6, 8, 10], "dropped": 0}
    rev = _data_folder(tmp_path / "rev", rows[::-1])
    with pytest.raises(ValueError, match=rf"{index_file}: .*rows 0 and 1 are table rows 10 and 8"):
        load_groups(_ctx(rev, index_file), rev.examples("beavertails", "align"))
    assert load_groups(_ctx(rev, index_file, reference_check=False), rev.examples("beavertails", "align")) \
        == [0, 1, 0, 0, 1, 0]
    short = _data_folder(tmp_path / "dropped", rows, dropped=1)
    with pytest.raises(ValueError, match="content.dropped.align"):
        load_groups(_ctx(short, index_file), short.examples("beavertails", "align"))
    with pytest.raises(ValueError, match="align_checksum"):
        load_groups(_ctx(source, index_file, reference_align_checksum="0" * 64), ex)
