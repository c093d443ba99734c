"""The codec library: encoders for capture, decoders for training, and dataset I/O.

Public interface: ``load_codec_config``, ``Codec``, ``PartWriter`` (with ``EncodedHidden``),
``Dataset``, and the file-system helpers every stage publishes through (``Storage``,
``publish_file``, ``publish_dir``, ``publish_tree``, ``fsync_path``, ``fsync_tree``,
``share_tree``, ``check_writable``).
"""

from .codec import (Codec, load_codec_config, needs_fitting, preset_names, sampling_of,
                    signal_of)
from .manifests import write_manifest_if_complete
from .reader import Dataset
from .storage import (Storage, check_writable, fsync_path, fsync_tree, publish_dir, publish_file,
                      publish_tree, share_tree)
from .writer import EncodedHidden, PartWriter

__all__ = ["Codec", "Dataset", "EncodedHidden", "PartWriter", "Storage", "check_writable",
           "fsync_path", "fsync_tree", "load_codec_config", "needs_fitting", "preset_names",
           "publish_dir", "publish_file", "publish_tree", "sampling_of", "share_tree",
           "signal_of",
           "write_manifest_if_complete"]
