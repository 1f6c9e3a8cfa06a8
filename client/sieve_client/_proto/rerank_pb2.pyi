from sieve_client._proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RerankMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RERANK_MODE_UNSPECIFIED: _ClassVar[RerankMode]
    RERANK_MODE_FULL: _ClassVar[RerankMode]
    RERANK_MODE_FIRST: _ClassVar[RerankMode]
    RERANK_MODE_SLIDING: _ClassVar[RerankMode]
    RERANK_MODE_INLINE: _ClassVar[RerankMode]
    RERANK_MODE_LIKELIHOOD: _ClassVar[RerankMode]
RERANK_MODE_UNSPECIFIED: RerankMode
RERANK_MODE_FULL: RerankMode
RERANK_MODE_FIRST: RerankMode
RERANK_MODE_SLIDING: RerankMode
RERANK_MODE_INLINE: RerankMode
RERANK_MODE_LIKELIHOOD: RerankMode

class RerankRequest(_message.Message):
    __slots__ = ("query", "passages", "return_text", "top_k", "mode", "fuse")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    RETURN_TEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FUSE_FIELD_NUMBER: _ClassVar[int]
    query: str
    passages: _containers.RepeatedScalarFieldContainer[str]
    return_text: bool
    top_k: int
    mode: RerankMode
    fuse: bool
    def __init__(self, query: _Optional[str] = ..., passages: _Optional[_Iterable[str]] = ..., return_text: _Optional[bool] = ..., top_k: _Optional[int] = ..., mode: _Optional[_Union[RerankMode, str]] = ..., fuse: _Optional[bool] = ...) -> None: ...

class Rank(_message.Message):
    __slots__ = ("index", "text", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    score: float
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("ranks", "metadata", "model", "mode", "passage_cap", "truncated", "fused")
    RANKS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_CAP_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    FUSED_FIELD_NUMBER: _ClassVar[int]
    ranks: _containers.RepeatedCompositeFieldContainer[Rank]
    metadata: _common_pb2.Metadata
    model: str
    mode: RerankMode
    passage_cap: int
    truncated: int
    fused: bool
    def __init__(self, ranks: _Optional[_Iterable[_Union[Rank, _Mapping]]] = ..., metadata: _Optional[_Union[_common_pb2.Metadata, _Mapping]] = ..., model: _Optional[str] = ..., mode: _Optional[_Union[RerankMode, str]] = ..., passage_cap: _Optional[int] = ..., truncated: _Optional[int] = ..., fused: _Optional[bool] = ...) -> None: ...
