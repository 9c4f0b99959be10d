from protos.recsys.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankRequest(_message.Message):
    __slots__ = ("context", "bundle_version", "item_ids", "source_bits", "source_names", "user_vector")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_BITS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NAMES_FIELD_NUMBER: _ClassVar[int]
    USER_VECTOR_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.UserContext
    bundle_version: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    source_bits: _containers.RepeatedScalarFieldContainer[int]
    source_names: _containers.RepeatedScalarFieldContainer[str]
    user_vector: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, context: _Optional[_Union[_common_pb2.UserContext, _Mapping]] = ..., bundle_version: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., source_bits: _Optional[_Iterable[int]] = ..., source_names: _Optional[_Iterable[str]] = ..., user_vector: _Optional[_Iterable[float]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("scores", "bundle_version")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    bundle_version: str
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., bundle_version: _Optional[str] = ...) -> None: ...

class BatchRankRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RankRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RankRequest, _Mapping]]] = ...) -> None: ...

class BatchRankResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[RankResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[RankResponse, _Mapping]]] = ...) -> None: ...
