"""Convert SSLRec's RetailRocket matrices to `bench/datasets/retailrocket.csv.gz`.

    git --git-dir MIRROR show HEAD:datasets/multi_behavior/retail_rocket/train_mat_view.pkl > DIR/...
    python -m kvrec.bench.datasets.convert_retailrocket DIR bench/datasets/retailrocket.csv.gz

HKUDS/SSLRec publishes RetailRocket as three pickled SciPy CSR matrices of shape
[users, items], one per behaviour (`train_mat_view.pkl`, `train_mat_cart.pkl`,
`train_mat_buy.pkl`), whose non-zero entries are the Unix time (seconds) of that user's
event of that behaviour on that item. They are read here without SciPy and without running
the pickles' code: an unpickler that builds only NumPy arrays and a plain holder for the
matrix's fields, and refuses every other class. Each entry becomes one row
`user_id,item_id,event_type,ts` (ts in epoch milliseconds; event types view, add_to_cart,
purchase, kvrec's names), rows sorted by (ts, user, item, event order). Ids are the matrices'
row and column numbers, 0-based. `test_mat.pkl` (one held-out purchase per user, no time) is
left out: an event without a time has no place in a time-ordered stream. The gzip header
carries no time or name, so the output's bytes (and sha256) depend on the input only.
"""

from __future__ import annotations

import csv
import gzip
import io
import pickle
import sys
from pathlib import Path

import numpy as np

BEHAVIOURS = (("view", "train_mat_view.pkl"), ("add_to_cart", "train_mat_cart.pkl"),
              ("purchase", "train_mat_buy.pkl"))


class _MatrixFields:
    """What a pickled scipy.sparse matrix holds (`data`, `indices`, `indptr`, `_shape`)."""

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)


class _NumpyOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if module.startswith("scipy.sparse") and name == "csr_matrix":
            return _MatrixFields
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return np.core.multiarray._reconstruct  # type: ignore[attr-defined]
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refused to build {module}.{name}")


def read_matrix(path: Path) -> list[tuple[int, int, int]]:
    """(row, column, value) of each stored entry of a pickled CSR matrix."""
    with path.open("rb") as handle:
        matrix = _NumpyOnly(handle).load()
    if not isinstance(matrix, _MatrixFields):
        raise SystemExit(f"{path}: not a CSR matrix")
    indptr, indices, data = (np.asarray(getattr(matrix, k)) for k in ("indptr", "indices", "data"))
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    return list(zip(rows.tolist(), indices.tolist(), data.astype(np.int64).tolist(), strict=True))


def convert(source: Path, out: Path) -> int:
    rows: list[tuple[int, int, int, int]] = []
    for order, (_, name) in enumerate(BEHAVIOURS):
        rows += [(ts, user, item, order) for user, item, ts in read_matrix(source / name) if ts > 0]
    rows.sort()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("user_id", "item_id", "event_type", "ts"))
    writer.writerows((user, item, BEHAVIOURS[order][0], ts * 1000) for ts, user, item, order in rows)
    with out.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(text.getvalue().encode())
    return len(rows)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m kvrec.bench.datasets.convert_retailrocket SOURCE_DIR OUT.csv.gz")
    print(convert(Path(sys.argv[1]), Path(sys.argv[2])), "events")
