"""kvrec: a streaming real-time recommender worker, installed as one namespace.

Every part lives under `kvrec`: `kvrec.stream` (Kafka and the loops), `kvrec.state` (windows and
caches), `kvrec.model` (encoder, training, export, retrieval), `kvrec.deploy` (what runs it) and
`kvrec.bench` (the benchmarks). The repository keeps the design's folders at its root
(`stream/`, `model/`, ...): a built wheel places them under `kvrec/` (pyproject.toml's
`package-dir`), and in a checkout the lines below let the same names find those folders.
"""

from pathlib import Path

_here = Path(__file__).resolve().parent
if not (_here / "stream").is_dir():  # a checkout: the packages are the repository's folders
    __path__.append(str(_here.parent))
