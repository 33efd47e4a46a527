"""codec: numerical codecs for model weights (standalone; never imports elvesfs).

Functional API: ``encode``, ``decode``, ``inspect``, ``available_codecs``, ``FrameError``,
``FrameInfo``. One numcodecs-style class per codec: ``RawCodec``, ``ZstdCodec``,
``ShuffleCodec``, ``PlanesCodec``, ``ElfCodec``, ``XorCodec``.
"""
from .errors import FrameError
from .api import FrameInfo, available_codecs, decode, encode, inspect, get_codec
from .raw import RawCodec
from .zstd_codec import ZstdCodec
from .shuffle import ShuffleCodec
from .planes import PlanesCodec
from .elf import ElfCodec
from .xor import XorCodec

__all__ = ["FrameError", "FrameInfo", "available_codecs", "decode", "encode", "inspect",
           "get_codec", "RawCodec", "ZstdCodec", "ShuffleCodec", "PlanesCodec", "ElfCodec", "XorCodec"]
