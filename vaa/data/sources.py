"""Where a dataset's splits live: a source maps (dataset, split) to rows.

The synthetic world and a local folder of real files share one layout,
``<root>/<dataset>/<split>.<ext>``, so tasks name logical splits and never paths.
"""

from __future__ import annotations

from pathlib import Path

from vaa.data.formats import Example, to_examples
from vaa.data.io import read_rows
from vaa.errors import DataError, MissingFile

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
# Dataset folder -> row format (vaa.data.formats).
DATASET_FORMATS = {"beavertails": "beavertails", "sst2": "sst2", "ag_news": "ag_news",
                   "gsm8k": "gsm8k", "alpaca_eval": "alpaca_eval"}


class FolderSource:
    """Datasets as files under one root directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, dataset: str, split: str) -> Path:
        for ext in EXTENSIONS:
            p = self.root / dataset / f"{split}{ext}"
            if p.is_file():
                return p
        missing = self.root / dataset / "MISSING.txt"  # a real table the data stage could not read
        if missing.is_file():
            from vaa.models.hub import MissingResource

            raise MissingResource(missing.read_text())
        raise MissingFile(
            f"no file for dataset {dataset!r} split {split!r} under {self.root}: expected "
            f"{self.root / dataset / split}{{{','.join(EXTENSIONS)}}}")

    def examples(self, dataset: str, split: str, start: int = 0, stop: int | None = None,
                 fmt: str | None = None) -> list[Example]:
        p = self.path(dataset, split)
        rows = read_rows(p, start, stop)
        if not rows:
            raise DataError(f"{p}: the slice [{start}:{stop}] selects no rows")
        return to_examples(rows, fmt or DATASET_FORMATS.get(dataset, dataset), str(p))

    def base_corpus(self) -> list[Example]:
        """Every ``<dataset>/base.*`` file: the corpus the base model is trained on."""
        out: list[Example] = []
        for d in sorted(DATASET_FORMATS):
            if any((self.root / d / f"base{e}").is_file() for e in EXTENSIONS):
                out += self.examples(d, "base")
        if not out:
            raise MissingFile(f"no base corpus (*/base.jsonl) under {self.root}")
        return out


def extra_examples(source, extra_data, names) -> dict[str, list[Example]]:
    """The extra data streams a method ``requires`` (``names``), each read from ``source`` as
    its ``extra_data.<name>`` entry says (dataset, split, start, stop, format)."""
    out = {}
    for name in names:
        if name not in extra_data:
            raise KeyError(f"a method requires the data stream {name!r} but the config has no "
                           f"extra_data.{name}; add it (see conf/config.yaml)")
        d = extra_data[name]
        out[name] = source.examples(d.dataset, d.split, d.start, d.stop, d.format)
    return out
