"""Run by nuscenes-devkit's own venv (see tests/test_sim_writers.py), not by pytest: load a dataroot
with the real devkit, walk every scene's samples, boxes, lidar, map mask and CAN bus, and print
one JSON line with what it found.

usage: python nuscenes_devkit_check.py VERSION DATAROOT
"""

import json
import sys

import numpy as np
from nuscenes.can_bus.can_bus_api import NuScenesCanBus
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.data_classes import LidarPointCloud
from nuscenes.utils.geometry_utils import view_points


def walk_scene(nusc, can, scene):
    mask = nusc.get("map", nusc.get("log", scene["log_token"])["map_token"])["mask"]
    rec = {"name": scene["name"], "samples": 0, "boxes": 0, "in_image": 0, "points": 0, "on_map": True,
           "first": [], "first_pixels": []}
    token = scene["first_sample_token"]
    while token:
        sample = nusc.get("sample", token)
        rec["samples"] += 1
        lidar = sample["data"]["LIDAR_TOP"]
        rec["points"] += LidarPointCloud.from_file(nusc.get_sample_data_path(lidar)).points.shape[1]
        rec["boxes"] += len([nusc.get_box(ann) for ann in sample["anns"]])
        _, flat_boxes, _ = nusc.get_sample_data(lidar, use_flat_vehicle_coordinates=True)
        _, cam_boxes, intrinsic = nusc.get_sample_data(sample["data"]["CAM_FRONT"])
        rec["in_image"] += len(cam_boxes)
        pose = nusc.get("ego_pose", nusc.get("sample_data", lidar)["ego_pose_token"])
        rec["on_map"] &= bool(mask.is_on_mask(pose["translation"][0], pose["translation"][1])[0])
        if rec["samples"] == 1:
            rec["first"] = sorted([b.name, *np.round(b.center, 3).tolist()] for b in flat_boxes)
            rec["first_pixels"] = sorted(
                [b.name, *view_points(b.center[:, None], intrinsic, normalize=True)[:2, 0].round(2).tolist()]
                for b in cam_boxes)
        token = sample["next"]
    poses = can.get_messages(scene["name"], "pose")
    route, _ = can.get_pose_and_route(scene["name"], print_warnings=False)
    rec.update(can_pose=len(poses), can_keys=sorted(poses[0]), route=len(route),
               imu=len(can.get_messages(scene["name"], "ms_imu")))
    return rec


def main():
    version, dataroot = sys.argv[1:3]
    nusc = NuScenes(version=version, dataroot=dataroot, verbose=False)
    can = NuScenesCanBus(dataroot=dataroot)
    print(json.dumps([walk_scene(nusc, can, scene) for scene in nusc.scene]))


if __name__ == "__main__":
    main()
