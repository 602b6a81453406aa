"""`kvrec export`'s flags and their checks, in a module that does not import torch: a missing
model folder or output folder is reported before the export code (model/export.py) loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvrec.errors import ConfigError
from kvrec.model.artifact_files import check_artifact_dir

# the graph's inputs and outputs, in order (model/export.py writes them, model/backends.py reads them)
EXPORT_INPUTS = ("keys", "values", "positions", "items", "event_types", "counts")
EXPORT_OUTPUTS = ("user_vectors", "new_keys", "new_values", "new_positions", "attention")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model artifact directory")
    parser.add_argument(
        "--out", required=True,
        help="ONNX file to write: a new file, or an earlier kvrec export (replaced); any other "
             "existing file is refused",
    )


def _is_kvrec_export(path: Path) -> bool:
    """An ONNX file with the inputs of a kvrec `step`/`extend` export (an earlier one)."""
    import onnx

    try:
        graph = onnx.load_model(str(path), load_external_data=False).graph
    except Exception:  # not ONNX at all: onnx raises protobuf's DecodeError, ValueError, ...
        return False
    return set(EXPORT_INPUTS[:4]) <= {value.name for value in graph.input}


def check_out(out: Path) -> None:
    """Refuse an --out that is a folder, lies in a missing folder, or is a file kvrec did not
    export (model/owned.py: nothing kvrec did not write is overwritten)."""
    if out.is_symlink():
        raise ConfigError(f"--out {out} is a symbolic link: name the ONNX file to write")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: name the ONNX file to write")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
    if out.exists() and not _is_kvrec_export(out):
        raise ConfigError(
            f"--out {out} is a file kvrec did not export: name a new file, or remove it yourself"
        )


def main(args: argparse.Namespace) -> int:
    check_out(Path(args.out))
    check_artifact_dir(args.model)
    from kvrec.model.export import main as export

    return export(args)
