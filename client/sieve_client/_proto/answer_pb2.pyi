from google.protobuf import struct_pb2 as _struct_pb2
from sieve_client._proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AnswerRequest(_message.Message):
    __slots__ = ("question", "collection", "passages", "k", "max_new_tokens", "temperature", "expansion", "filters", "policy", "block_size")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    EXPANSION_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    question: str
    collection: str
    passages: _containers.RepeatedScalarFieldContainer[str]
    k: int
    max_new_tokens: int
    temperature: float
    expansion: float
    filters: _struct_pb2.Struct
    policy: str
    block_size: int
    def __init__(self, question: _Optional[str] = ..., collection: _Optional[str] = ..., passages: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., expansion: _Optional[float] = ..., filters: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., policy: _Optional[str] = ..., block_size: _Optional[int] = ...) -> None: ...

class Citation(_message.Message):
    __slots__ = ("chunk_id", "document_id", "score", "index", "text")
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    chunk_id: int
    document_id: str
    score: float
    index: int
    text: str
    def __init__(self, chunk_id: _Optional[int] = ..., document_id: _Optional[str] = ..., score: _Optional[float] = ..., index: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class AnswerUsage(_message.Message):
    __slots__ = ("prompt_positions", "full_prompt_tokens", "blocks", "expanded_blocks", "generated_tokens", "precomputed_passages", "time_to_first_token_ns", "model", "block_size")
    PROMPT_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    FULL_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EXPANDED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRECOMPUTED_PASSAGES_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_NS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    prompt_positions: int
    full_prompt_tokens: int
    blocks: int
    expanded_blocks: int
    generated_tokens: int
    precomputed_passages: int
    time_to_first_token_ns: int
    model: str
    block_size: int
    def __init__(self, prompt_positions: _Optional[int] = ..., full_prompt_tokens: _Optional[int] = ..., blocks: _Optional[int] = ..., expanded_blocks: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., precomputed_passages: _Optional[int] = ..., time_to_first_token_ns: _Optional[int] = ..., model: _Optional[str] = ..., block_size: _Optional[int] = ...) -> None: ...

class AnswerResponse(_message.Message):
    __slots__ = ("text", "citations", "metadata", "finish_reason", "usage")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    citations: _containers.RepeatedCompositeFieldContainer[Citation]
    metadata: _common_pb2.Metadata
    finish_reason: str
    usage: AnswerUsage
    def __init__(self, text: _Optional[str] = ..., citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., metadata: _Optional[_Union[_common_pb2.Metadata, _Mapping]] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[AnswerUsage, _Mapping]] = ...) -> None: ...
