from sieve_client._proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AnswerRequest(_message.Message):
    __slots__ = ("question", "collection", "passages", "k", "max_new_tokens", "temperature")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    question: str
    collection: str
    passages: _containers.RepeatedScalarFieldContainer[str]
    k: int
    max_new_tokens: int
    temperature: float
    def __init__(self, question: _Optional[str] = ..., collection: _Optional[str] = ..., passages: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ...) -> None: ...

class Citation(_message.Message):
    __slots__ = ("chunk_id", "document_id", "score")
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    chunk_id: int
    document_id: str
    score: float
    def __init__(self, chunk_id: _Optional[int] = ..., document_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class AnswerResponse(_message.Message):
    __slots__ = ("text", "citations", "metadata")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    text: str
    citations: _containers.RepeatedCompositeFieldContainer[Citation]
    metadata: _common_pb2.Metadata
    def __init__(self, text: _Optional[str] = ..., citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., metadata: _Optional[_Union[_common_pb2.Metadata, _Mapping]] = ...) -> None: ...
