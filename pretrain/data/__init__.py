"""The training data path: token shards -> numpy TaskBatches, exactly resumable (docs/data.md).

    config   DataConfig: which data a run reads (the `data` config group)
    plan     the read plan of an epoch and the typed cursors (Cursor, Position, Resize)
    reader   ShardReader: one loader worker's share of a rank's batches
    stream   BatchStream: a split split by rank and worker, with its StreamState
    mixing   MixedStream: a weighted mix of datasets; open_train_stream, the trainer's entry point
"""
from .config import DataConfig, DataSource
from .mixing import MixedStream, data_counters, open_train_stream
from .stream import BatchStream

__all__ = ["BatchStream", "DataConfig", "DataSource", "MixedStream", "data_counters", "open_train_stream"]
