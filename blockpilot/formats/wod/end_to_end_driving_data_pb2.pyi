# ruff: noqa
# mypy: ignore-errors
from blockpilot.formats.wod import dataset_pb2 as _dataset_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class E2EDFrame(_message.Message):
    __slots__ = ("frame", "future_states", "past_states", "intent", "preference_trajectories")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    FUTURE_STATES_FIELD_NUMBER: _ClassVar[int]
    PAST_STATES_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    frame: _dataset_pb2.Frame
    future_states: EgoTrajectoryStates
    past_states: EgoTrajectoryStates
    intent: EgoIntent.Intent
    preference_trajectories: _containers.RepeatedCompositeFieldContainer[EgoTrajectoryStates]
    def __init__(self, frame: _Optional[_Union[_dataset_pb2.Frame, _Mapping]] = ..., future_states: _Optional[_Union[EgoTrajectoryStates, _Mapping]] = ..., past_states: _Optional[_Union[EgoTrajectoryStates, _Mapping]] = ..., intent: _Optional[_Union[EgoIntent.Intent, str]] = ..., preference_trajectories: _Optional[_Iterable[_Union[EgoTrajectoryStates, _Mapping]]] = ...) -> None: ...

class EgoTrajectoryStates(_message.Message):
    __slots__ = ("pos_x", "pos_y", "pos_z", "vel_x", "vel_y", "accel_x", "accel_y", "preference_score")
    POS_X_FIELD_NUMBER: _ClassVar[int]
    POS_Y_FIELD_NUMBER: _ClassVar[int]
    POS_Z_FIELD_NUMBER: _ClassVar[int]
    VEL_X_FIELD_NUMBER: _ClassVar[int]
    VEL_Y_FIELD_NUMBER: _ClassVar[int]
    ACCEL_X_FIELD_NUMBER: _ClassVar[int]
    ACCEL_Y_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_SCORE_FIELD_NUMBER: _ClassVar[int]
    pos_x: _containers.RepeatedScalarFieldContainer[float]
    pos_y: _containers.RepeatedScalarFieldContainer[float]
    pos_z: _containers.RepeatedScalarFieldContainer[float]
    vel_x: _containers.RepeatedScalarFieldContainer[float]
    vel_y: _containers.RepeatedScalarFieldContainer[float]
    accel_x: _containers.RepeatedScalarFieldContainer[float]
    accel_y: _containers.RepeatedScalarFieldContainer[float]
    preference_score: float
    def __init__(self, pos_x: _Optional[_Iterable[float]] = ..., pos_y: _Optional[_Iterable[float]] = ..., pos_z: _Optional[_Iterable[float]] = ..., vel_x: _Optional[_Iterable[float]] = ..., vel_y: _Optional[_Iterable[float]] = ..., accel_x: _Optional[_Iterable[float]] = ..., accel_y: _Optional[_Iterable[float]] = ..., preference_score: _Optional[float] = ...) -> None: ...

class EgoIntent(_message.Message):
    __slots__ = ()
    class Intent(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[EgoIntent.Intent]
        GO_STRAIGHT: _ClassVar[EgoIntent.Intent]
        GO_LEFT: _ClassVar[EgoIntent.Intent]
        GO_RIGHT: _ClassVar[EgoIntent.Intent]
    UNKNOWN: EgoIntent.Intent
    GO_STRAIGHT: EgoIntent.Intent
    GO_LEFT: EgoIntent.Intent
    GO_RIGHT: EgoIntent.Intent
    def __init__(self) -> None: ...
