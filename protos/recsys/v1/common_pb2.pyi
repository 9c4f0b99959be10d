from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("user_id", "item_id", "timestamp", "event_id", "type")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    timestamp: int
    event_id: str
    type: str
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., timestamp: _Optional[int] = ..., event_id: _Optional[str] = ..., type: _Optional[str] = ...) -> None: ...

class UserContext(_message.Message):
    __slots__ = ("recent_item_ids", "recent_timestamps")
    RECENT_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    RECENT_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    recent_item_ids: _containers.RepeatedScalarFieldContainer[str]
    recent_timestamps: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, recent_item_ids: _Optional[_Iterable[str]] = ..., recent_timestamps: _Optional[_Iterable[int]] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "sources", "stage_scores")
    class StageScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    STAGE_SCORES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    sources: _containers.RepeatedScalarFieldContainer[str]
    stage_scores: _containers.ScalarMap[str, float]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., sources: _Optional[_Iterable[str]] = ..., stage_scores: _Optional[_Mapping[str, float]] = ...) -> None: ...
