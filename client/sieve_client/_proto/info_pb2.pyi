from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "dim", "max_length", "default_pooling", "query_instruction", "document_instruction", "loaded", "int8_calibrated")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POOLING_FIELD_NUMBER: _ClassVar[int]
    QUERY_INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    INT8_CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    max_length: int
    default_pooling: str
    query_instruction: str
    document_instruction: str
    loaded: bool
    int8_calibrated: bool
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., max_length: _Optional[int] = ..., default_pooling: _Optional[str] = ..., query_instruction: _Optional[str] = ..., document_instruction: _Optional[str] = ..., loaded: _Optional[bool] = ..., int8_calibrated: _Optional[bool] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_texts_per_request", "max_batch_tokens", "max_queued_texts", "max_message_bytes", "max_k", "max_documents_per_upsert", "max_rerank_passages", "max_answer_passages", "max_new_tokens", "max_waiting_generations")
    MAX_TEXTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_TEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENTS_PER_UPSERT_FIELD_NUMBER: _ClassVar[int]
    MAX_RERANK_PASSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_ANSWER_PASSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_WAITING_GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    max_texts_per_request: int
    max_batch_tokens: int
    max_queued_texts: int
    max_message_bytes: int
    max_k: int
    max_documents_per_upsert: int
    max_rerank_passages: int
    max_answer_passages: int
    max_new_tokens: int
    max_waiting_generations: int
    def __init__(self, max_texts_per_request: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_queued_texts: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_k: _Optional[int] = ..., max_documents_per_upsert: _Optional[int] = ..., max_rerank_passages: _Optional[int] = ..., max_answer_passages: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_waiting_generations: _Optional[int] = ...) -> None: ...

class GenerationModelInfo(_message.Message):
    __slots__ = ("name", "loaded", "block_size", "default_expansion", "default_policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_EXPANSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    loaded: bool
    block_size: int
    default_expansion: float
    default_policy: str
    def __init__(self, name: _Optional[str] = ..., loaded: _Optional[bool] = ..., block_size: _Optional[int] = ..., default_expansion: _Optional[float] = ..., default_policy: _Optional[str] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("version", "default_model", "models", "limits", "auth_enabled", "reranker", "answerer", "answerers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    AUTH_ENABLED_FIELD_NUMBER: _ClassVar[int]
    RERANKER_FIELD_NUMBER: _ClassVar[int]
    ANSWERER_FIELD_NUMBER: _ClassVar[int]
    ANSWERERS_FIELD_NUMBER: _ClassVar[int]
    version: str
    default_model: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    limits: Limits
    auth_enabled: bool
    reranker: GenerationModelInfo
    answerer: GenerationModelInfo
    answerers: _containers.RepeatedCompositeFieldContainer[GenerationModelInfo]
    def __init__(self, version: _Optional[str] = ..., default_model: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., auth_enabled: _Optional[bool] = ..., reranker: _Optional[_Union[GenerationModelInfo, _Mapping]] = ..., answerer: _Optional[_Union[GenerationModelInfo, _Mapping]] = ..., answerers: _Optional[_Iterable[_Union[GenerationModelInfo, _Mapping]]] = ...) -> None: ...
