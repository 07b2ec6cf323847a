"""Rows of an original dataset from a local file, in its published schema:
JSONL (or a JSON list), CSV, parquet, or a directory written by HF `datasets`'
`save_to_disk` (a Dataset, or a DatasetDict of splits). Nothing is downloaded;
parquet and arrow need pyarrow (`pip install "memgen-engine[eval]"`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memgen.jsonl import iter_jsonl


def read_rows(path: str | Path, split: str | None = None, default_split: str | None = None) -> list[dict[str, Any]]:
    """Every row as a dict. `split` picks a split of a DatasetDict directory
    (else `default_split` when it has one, else its only split)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset file or directory {str(path)!r}")
    if path.is_dir():
        return _read_saved(path, split, default_split)
    if split is not None:
        raise ValueError(f"--split {split!r} applies to a save_to_disk directory, not to the file {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _pyarrow().parquet.read_table(str(path)).to_pylist()
    if suffix == ".arrow":
        return _read_arrow(path)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_json(path)
    if suffix == ".csv":                    # GPQA is published as CSV (gpqa_diamond.csv)
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"{path}: unknown dataset format {suffix!r}; give a .jsonl, .json, .csv, .parquet or .arrow file, "
                     "or a directory written by datasets' save_to_disk")


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):                       # one JSON list
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        _check_objects(path, rows, lambda i: f"item {i}")
        return rows
    rows = [obj for _, obj in iter_jsonl(path, text.splitlines())]
    _check_objects(path, rows, lambda i: f"row {i + 1}")
    return rows


def _check_objects(path: Path, rows: Any, where) -> None:
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected JSON objects, one per line, or a list of them")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: {where(i)} is a {type(row).__name__}, expected a JSON object")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError('reading parquet / arrow datasets needs pyarrow: pip install "memgen-engine[eval]"') from None
    return pyarrow


def _read_arrow(path: Path) -> list[dict[str, Any]]:
    """An arrow file as `datasets` writes it (IPC stream), or an IPC file."""
    pa = _pyarrow()
    ipc = pa.ipc
    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"cannot read arrow file {path}: {e}") from None
    return table.to_pylist()


def _read_saved(path: Path, split: str | None, default_split: str | None) -> list[dict[str, Any]]:
    if (path / "dataset_dict.json").is_file():            # a DatasetDict: one folder per split
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits") or sorted(
            p.name for p in path.iterdir() if (p / "state.json").is_file())
        if split is None:
            split = default_split if default_split in splits else (splits[0] if len(splits) == 1 else None)
        if split not in splits:
            raise ValueError(f"{path} holds the splits {', '.join(splits)}: choose one with --split")
        return _read_saved(path / split, None, None)
    state = path / "state.json"
    if not state.is_file():
        raise ValueError(f"{path} is not a save_to_disk directory (no dataset_dict.json or state.json); "
                         "give the dataset's .jsonl or .parquet file instead")
    if split is not None:
        raise ValueError(f"{path} is a single split; --split applies to a DatasetDict directory")
    files = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    if not files:
        raise ValueError(f"{state} lists no data files")
    rows: list[dict[str, Any]] = []
    for name in files:
        rows += _read_arrow(path / name)
    return rows
