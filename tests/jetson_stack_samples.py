"""Recorded software stacks of Jetsons, for ``blockpilot jetson doctor``: /etc/nv_tegra_release, the device tree and
``dpkg-query -W`` listings (``${binary:Package}<TAB>${Version}``, dpkg-query's default format) of Orin on JetPack 6.0
and 6.2 and of Thor on JetPack 7.0, plus the Python distributions a venv may hold.

What the versions rest on (looked up with the search tool):

* JetPack 6.0 = L4T R36.3 (jetson-containers l4t_version.py, as in blockpilot/jetson/platform.py); it ships CUDA
  12.2, cuDNN 8.9 and TensorRT 8.6 (ultralytics/ultralytics#7196 "Jetpack 6 contains Cuda 12.2, cudnn 8.9 tensorrt
  8.6"; NVIDIA/DL4AGX#67 "jetpack 6.0 rev.2 (tensorrt 8.6.2)").
* JetPack 6.2 = L4T R36.4.3 (balena-os/balena-jetson-orin#541 "Jetpack 6.2 - L4T 36.4.3"): CUDA 12.6, TensorRT 10.3,
  cuDNN 9.3 (docs.pytorch.org/TensorRT getting_started/jetpack "JetPack 6.2"; pytorch/TensorRT#3453). NVIDIA's
  torch build for it is 2.5.0a0+872d972e41.nv24.08 (the wheel pytorch/TensorRT#3453 installs).
* JetPack 7.0 = Jetson Linux 38.2/38.2.1 (developer.nvidia.com/embedded/jetpack/downloads/archive-7.0), Ubuntu
  24.04 / ROS 2 Jazzy; nvcc 13.0 V13.0.48 (autowarefoundation/spconv_cpp#7, "JetPack: 7.0"); TensorRT
  10.13.3.9+cuda13.0 (autowarefoundation/autoware#7108); cuDNN 9.12 for CUDA 13 (dusty-nv/jetson-containers#1263).

The major.minor versions above are what those sources state. The rest of each package version (JetPack build
``+bNN``, dpkg revisions, the L4T core's timestamp, the cuDNN / TensorRT build numbers of JetPack 6.0, the rclpy
patch releases and the GCID of R36.3) follows the packages' real formats but is not confirmed by a source.
"""

from __future__ import annotations

from jetson_samples import AGX_ORIN_64GB, AGX_THOR, Board, release

# JetPack 6.0 on an AGX Orin 64GB: same module, L4T R36.3.0.
AGX_ORIN_JP60 = Board(AGX_ORIN_64GB.compatible, AGX_ORIN_64GB.model,
                      release("36", "3.0", "36191598", "Mon May  6 17:34:21 UTC 2024"))
AGX_ORIN_JP62 = AGX_ORIN_64GB  # R36.4.3
AGX_THOR_JP70 = AGX_THOR  # R38.2.1

DPKG_ORIN_JP60 = """\
cuda-cudart-12-2\t12.2.140-1
cuda-toolkit-12-2\t12.2.2-1
libcudnn8\t8.9.4.25-1+cuda12.2
libnvinfer8\t8.6.2.3-1+cuda12.2
nvidia-jetpack\t6.0+b106
nvidia-l4t-core\t36.3.0-20240506102626
python3-libnvinfer\t8.6.2.3-1+cuda12.2
ros-humble-rclpy\t3.3.13-1jammy.20240426.020405
tensorrt\t8.6.2.3-1+cuda12.2
"""
DPKG_ORIN_JP62 = """\
cuda-cudart-12-6\t12.6.68-1
cuda-toolkit-12-6\t12.6.11-1
libcudnn9-cuda-12\t9.3.0.75-1
libnvinfer10\t10.3.0.30-1+cuda12.5
nvidia-jetpack\t6.2+b77
nvidia-l4t-core\t36.4.3-20250107174145
python3-libnvinfer\t10.3.0.30-1+cuda12.5
ros-humble-rclpy\t3.3.16-1jammy.20250325.055122
tensorrt\t10.3.0.30-1+cuda12.5
"""
DPKG_THOR_JP70 = """\
cuda-cudart-13-0\t13.0.48-1
cuda-toolkit-13-0\t13.0.0-1
libcudnn9-cuda-13\t9.12.0.46-1
libnvinfer10\t10.13.3.9-1+cuda13.0
nvidia-jetpack\t7.0+b128
nvidia-l4t-core\t38.2.1-20250821174705
python3-libnvinfer\t10.13.3.9-1+cuda13.0
ros-jazzy-rclpy\t7.1.5-1noble.20250814.190327
tensorrt\t10.13.3.9-1+cuda13.0
"""

# Python distributions (component -> version, as blockpilot.jetson.stack.python_versions returns them).
PY_ORIN_BARE = {"tensorrt": "10.3.0", "cuda-python": "12.6.2.post1"}  # a --system-site-packages venv, no torch
PY_ORIN_PLUGIN = {**PY_ORIN_BARE, "torch": "2.5.0a0+872d972e41.nv24.08", "triton": "3.4.0"}
PY_ORIN_CUDA13 = {**PY_ORIN_BARE, "cuda-python": "13.0.1"}  # what an unbounded `pip install cuda-python` resolves to
PY_ORIN_JP60 = {"tensorrt": "8.6.2", "cuda-python": "12.2.1"}
PY_THOR_BARE = {"tensorrt": "10.13.3.9", "cuda-python": "13.0.1"}
