"""`kvrec export`'s flags and their checks, in a module that does not import torch: a missing
model folder or output folder is reported before the export code (model/export.py) loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.artifact_files import check_artifact_dir
from model.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model artifact directory")
    parser.add_argument("--out", required=True, help="ONNX file to write")


def check_out(out: Path) -> None:
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: name the ONNX file to write")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")


def main(args: argparse.Namespace) -> int:
    check_out(Path(args.out))
    check_artifact_dir(args.model)
    from model.export import main as export

    return export(args)
