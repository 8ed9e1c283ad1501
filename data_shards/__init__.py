"""Write image datasets as WebDataset shards with DALI index files and a manifest (`python -m data_shards`).

Sources: an image folder, CIFAR-10 pickles, an LSUN LMDB, CelebA (CelebA64 crop), MNIST IDX files and
StackedMNIST generated from MNIST. The format itself (names, index files, manifest, reading) lives in
ddaebm/data/shards.py, which the loaders share.
"""

from data_shards.verify import verify_dir
from data_shards.writer import Record, write_split

__all__ = ["Record", "verify_dir", "write_split"]
