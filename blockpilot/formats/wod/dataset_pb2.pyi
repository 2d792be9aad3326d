# ruff: noqa
# mypy: ignore-errors
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CameraName(_message.Message):
    __slots__ = ()
    class Name(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[CameraName.Name]
        FRONT: _ClassVar[CameraName.Name]
        FRONT_LEFT: _ClassVar[CameraName.Name]
        FRONT_RIGHT: _ClassVar[CameraName.Name]
        SIDE_LEFT: _ClassVar[CameraName.Name]
        SIDE_RIGHT: _ClassVar[CameraName.Name]
        REAR_LEFT: _ClassVar[CameraName.Name]
        REAR: _ClassVar[CameraName.Name]
        REAR_RIGHT: _ClassVar[CameraName.Name]
    UNKNOWN: CameraName.Name
    FRONT: CameraName.Name
    FRONT_LEFT: CameraName.Name
    FRONT_RIGHT: CameraName.Name
    SIDE_LEFT: CameraName.Name
    SIDE_RIGHT: CameraName.Name
    REAR_LEFT: CameraName.Name
    REAR: CameraName.Name
    REAR_RIGHT: CameraName.Name
    def __init__(self) -> None: ...

class Transform(_message.Message):
    __slots__ = ("transform",)
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    transform: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, transform: _Optional[_Iterable[float]] = ...) -> None: ...

class CameraCalibration(_message.Message):
    __slots__ = ("name", "intrinsic", "extrinsic", "width", "height", "rolling_shutter_direction")
    class RollingShutterReadOutDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[CameraCalibration.RollingShutterReadOutDirection]
        TOP_TO_BOTTOM: _ClassVar[CameraCalibration.RollingShutterReadOutDirection]
        LEFT_TO_RIGHT: _ClassVar[CameraCalibration.RollingShutterReadOutDirection]
        BOTTOM_TO_TOP: _ClassVar[CameraCalibration.RollingShutterReadOutDirection]
        RIGHT_TO_LEFT: _ClassVar[CameraCalibration.RollingShutterReadOutDirection]
        GLOBAL_SHUTTER: _ClassVar[CameraCalibration.RollingShutterReadOutDirection]
    UNKNOWN: CameraCalibration.RollingShutterReadOutDirection
    TOP_TO_BOTTOM: CameraCalibration.RollingShutterReadOutDirection
    LEFT_TO_RIGHT: CameraCalibration.RollingShutterReadOutDirection
    BOTTOM_TO_TOP: CameraCalibration.RollingShutterReadOutDirection
    RIGHT_TO_LEFT: CameraCalibration.RollingShutterReadOutDirection
    GLOBAL_SHUTTER: CameraCalibration.RollingShutterReadOutDirection
    NAME_FIELD_NUMBER: _ClassVar[int]
    INTRINSIC_FIELD_NUMBER: _ClassVar[int]
    EXTRINSIC_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ROLLING_SHUTTER_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    name: CameraName.Name
    intrinsic: _containers.RepeatedScalarFieldContainer[float]
    extrinsic: Transform
    width: int
    height: int
    rolling_shutter_direction: CameraCalibration.RollingShutterReadOutDirection
    def __init__(self, name: _Optional[_Union[CameraName.Name, str]] = ..., intrinsic: _Optional[_Iterable[float]] = ..., extrinsic: _Optional[_Union[Transform, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., rolling_shutter_direction: _Optional[_Union[CameraCalibration.RollingShutterReadOutDirection, str]] = ...) -> None: ...

class Context(_message.Message):
    __slots__ = ("name", "camera_calibrations", "stats")
    class Stats(_message.Message):
        __slots__ = ("time_of_day", "location", "weather")
        TIME_OF_DAY_FIELD_NUMBER: _ClassVar[int]
        LOCATION_FIELD_NUMBER: _ClassVar[int]
        WEATHER_FIELD_NUMBER: _ClassVar[int]
        time_of_day: str
        location: str
        weather: str
        def __init__(self, time_of_day: _Optional[str] = ..., location: _Optional[str] = ..., weather: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAMERA_CALIBRATIONS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    name: str
    camera_calibrations: _containers.RepeatedCompositeFieldContainer[CameraCalibration]
    stats: Context.Stats
    def __init__(self, name: _Optional[str] = ..., camera_calibrations: _Optional[_Iterable[_Union[CameraCalibration, _Mapping]]] = ..., stats: _Optional[_Union[Context.Stats, _Mapping]] = ...) -> None: ...

class CameraImage(_message.Message):
    __slots__ = ("name", "image")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    name: CameraName.Name
    image: bytes
    def __init__(self, name: _Optional[_Union[CameraName.Name, str]] = ..., image: _Optional[bytes] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("context", "timestamp_micros", "images")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MICROS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    context: Context
    timestamp_micros: int
    images: _containers.RepeatedCompositeFieldContainer[CameraImage]
    def __init__(self, context: _Optional[_Union[Context, _Mapping]] = ..., timestamp_micros: _Optional[int] = ..., images: _Optional[_Iterable[_Union[CameraImage, _Mapping]]] = ...) -> None: ...
