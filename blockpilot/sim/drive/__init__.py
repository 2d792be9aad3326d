"""Closed-loop driving in the synthetic world (issue 19).

A generated scene's layout becomes a live world (:mod:`.world`): the ego on a kinematic bicycle tracking the latest
plan with pure pursuit and a speed PI controller (:mod:`.vehicle`), reactive IDM vehicles and cyclists, pedestrians
who wait for a gap. A policy (:mod:`.policies`: the expert, constant velocity; the planner's adapter is in
``blockpilot.eval.drive_policy``) plans every 0.5 s from the rendered observation; :func:`.episode.run_episode`
records a :class:`.episode.DriveLog`, which ``blockpilot.eval.closed_loop_metrics`` scores.
"""
