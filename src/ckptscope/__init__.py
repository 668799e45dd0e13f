"""ckptscope: how every layer of a network changes across training checkpoints.

Data flows one way: a source yields checkpoints (`ckptscope.ingest`), a checkpoint yields
tensors, analyzers turn tensors into rows (`ckptscope.analyzers`), the store writes rows
(`ckptscope.store`), and reports and SQL read the store.
"""

from ckptscope.errors import CkptscopeError
from ckptscope.pipeline import ingest
from ckptscope.store.db import Store, default_store_path

__all__ = ["CkptscopeError", "Store", "default_store_path", "ingest"]
__version__ = "0.1.0"
