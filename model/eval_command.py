"""`kvrec eval`'s flags and their checks, in a module that does not import torch: a missing
model folder or data file is reported before the evaluation code (model/evaluate.py) loads."""

from __future__ import annotations

import argparse

from kvrec.flags import integer
from kvrec.model.artifact_files import check_artifact_dir
from kvrec.model.datasets import add_dataset_arguments, check_dataset_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model artifact directory")
    add_dataset_arguments(parser)
    parser.add_argument("--split", default="test", choices=("test", "validation"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--max-len", type=integer(0), default=0, help="0 = the training max length")


def main(args: argparse.Namespace) -> int:
    check_artifact_dir(args.model)
    check_dataset_arguments(args)
    from kvrec.model.evaluate import main as evaluate

    return evaluate(args)
