"""What a worker remembers: per-user windows on RocksDB and in-memory key/value caches."""
