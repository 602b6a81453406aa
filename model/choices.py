"""The names the command line offers for the model's parts, in a module that imports neither
torch nor faiss: parsing `kvrec worker`'s flags, and serving its probes from the first second,
do not wait for them (`model/backends.py` and `model/retrieval.py` use these names)."""

BACKENDS = ("torch-cpu", "torch-cuda", "onnx-cpu")
RETRIEVAL_KINDS = ("auto", "exact", "ivfflat", "ivfpq", "hnsw", "torch-exact")
