"""The codec library: encoders for capture, decoders for training, and dataset I/O.

Public interface: ``load_codec_config``, ``Codec``, ``PartWriter``, ``Dataset``.
"""

from .codec import Codec, load_codec_config, preset_names
from .reader import Dataset
from .writer import PartWriter, write_manifest_if_complete

__all__ = ["Codec", "Dataset", "PartWriter", "load_codec_config", "preset_names",
           "write_manifest_if_complete"]
