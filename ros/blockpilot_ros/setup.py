"""colcon (ament_python) package of the blockpilot ROS 2 nodes.

It installs no Python code of its own: the entry points run the nodes of the ``blockpilot`` package,
which must be pip-installed into the Python environment that ROS uses (see README.md).
"""

from glob import glob

from setuptools import setup

PACKAGE = "blockpilot_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=[],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml", "README.md"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="blockpilot maintainers",
    maintainer_email="blockpilot@example.com",
    description="ROS 2 nodes of blockpilot: planner and arm (lifecycle), rosbag2 and LeRobot replay, recorder",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "planner_node = blockpilot.ros_nodes.planner_node:main",
            "arm_node = blockpilot.ros_nodes.arm_node:main",
            "replay_node = blockpilot.ros_nodes.replay_node:main",
            "lerobot_replay_node = blockpilot.ros_nodes.lerobot_replay:main",
            "recorder_node = blockpilot.ros_nodes.recorder_node:main",
        ],
    },
)
