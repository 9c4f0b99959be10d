from protos.recsys.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("context", "vector", "k", "exclude_item_ids", "exclude_context", "bundle_version", "columns")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.UserContext
    vector: Vector
    k: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    exclude_context: bool
    bundle_version: str
    columns: bool
    def __init__(self, context: _Optional[_Union[_common_pb2.UserContext, _Mapping]] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., k: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., exclude_context: _Optional[bool] = ..., bundle_version: _Optional[str] = ..., columns: _Optional[bool] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("items", "bundle_version", "shard", "method", "query_vector", "item_ids", "scores")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    QUERY_VECTOR_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredItem]
    bundle_version: str
    shard: str
    method: str
    query_vector: _containers.RepeatedScalarFieldContainer[float]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, items: _Optional[_Iterable[_Union[_common_pb2.ScoredItem, _Mapping]]] = ..., bundle_version: _Optional[str] = ..., shard: _Optional[str] = ..., method: _Optional[str] = ..., query_vector: _Optional[_Iterable[float]] = ..., item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class BatchSearchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SearchRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SearchRequest, _Mapping]]] = ...) -> None: ...

class BatchSearchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[SearchResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[SearchResponse, _Mapping]]] = ...) -> None: ...

class SetUnavailableRequest(_message.Message):
    __slots__ = ("add_item_ids", "remove_item_ids", "clear")
    ADD_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    add_item_ids: _containers.RepeatedScalarFieldContainer[str]
    remove_item_ids: _containers.RepeatedScalarFieldContainer[str]
    clear: bool
    def __init__(self, add_item_ids: _Optional[_Iterable[str]] = ..., remove_item_ids: _Optional[_Iterable[str]] = ..., clear: _Optional[bool] = ...) -> None: ...

class SetUnavailableResponse(_message.Message):
    __slots__ = ("runtime_unavailable", "unavailable_in_shard", "bundle_version")
    RUNTIME_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_IN_SHARD_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    runtime_unavailable: int
    unavailable_in_shard: int
    bundle_version: str
    def __init__(self, runtime_unavailable: _Optional[int] = ..., unavailable_in_shard: _Optional[int] = ..., bundle_version: _Optional[str] = ...) -> None: ...
