"""Thin ROS 2 lifecycle nodes around the Planner."""
