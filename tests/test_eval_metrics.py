"""Planning metrics against hand-computed answers (every expected value is derived in a comment)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from blockpilot.eval.metrics import (
    EGO_LENGTH_M,
    EGO_WIDTH_M,
    RfsResult,
    ade_fde,
    bev_planner_footprint,
    collisions_bev_planner,
    collisions_stp3,
    common_steps,
    l2_errors,
    percentiles,
    rater_directions,
    rater_feedback_score,
    resample_trajectory,
    rfs_horizons,
    rfs_speed_scale,
    rfs_thresholds,
    stp3_ego_template,
    trajectory_headings,
    trust_regions,
)
from blockpilot.eval.types import RatedTrajectory

T4 = 0.25 * np.arange(1, 21)  # 4 Hz, 0.25 .. 5.0 s
STRAIGHT = np.stack([10.0 * T4, np.zeros(20)], axis=1)  # 10 m/s along +x: 30 m at 3 s (step 11), 50 m at 5 s (19)


def box(x: float, y: float, length: float, width: float, yaw: float = 0.0) -> np.ndarray:
    return np.array([[x, y, yaw, length, width]])


# ----------------------------------------------------------------------------- displacement


def test_l2_errors_per_step() -> None:
    # |(3, 4)| = 5, |(0, 0)| = 0, |(-1, 0) - (0, 0)| = 1
    assert l2_errors([[0, 0], [3, 4], [-1, 0]], [[0, 0], [0, 0], [0, 0]]).tolist() == [0.0, 5.0, 1.0]
    with pytest.raises(ValueError):
        l2_errors(np.zeros((3, 2)), np.zeros((2, 2)))


def test_common_steps_2hz_against_4hz() -> None:
    pred_t = T4[:12]  # 0.25 .. 3.0
    gt_t = 0.5 * np.arange(1, 7) + 1e-9  # 0.5 .. 3.0 with float noise
    pi, gi = common_steps(pred_t, gt_t)
    # 0.5 s is pred index 1, 1.0 s index 3, ... 3.0 s index 11
    assert pi.tolist() == [1, 3, 5, 7, 9, 11]
    assert gi.tolist() == [0, 1, 2, 3, 4, 5]
    pi, gi = common_steps([0.5, 1.0], [1.0, 1.5])
    assert (pi.tolist(), gi.tolist()) == ([1], [0])


def test_resample_2hz_to_4hz_goes_through_origin() -> None:
    out = resample_trajectory([[2.0, 0.0], [4.0, 2.0]], [0.5, 1.0], [0.25, 0.5, 0.75, 1.0])
    # 0.25 s: half way from the origin to (2, 0) -> (1, 0); 0.75 s: half way from (2, 0) to (4, 2) -> (3, 1)
    np.testing.assert_allclose(out, [[1, 0], [2, 0], [3, 1], [4, 2]])
    with pytest.raises(ValueError):
        resample_trajectory([[2.0, 0.0]], [0.5], [0.75])  # beyond the last time
    with pytest.raises(ValueError):
        resample_trajectory([[2.0, 0.0]], [0.5], [0.0])


def test_ade_fde_at_3s_and_5s() -> None:
    errors = 0.1 * np.arange(1, 21)  # 0.1 at 0.25 s .. 2.0 at 5 s
    # 3 s: steps 1..12 -> mean(0.1..1.2) = 0.65, final 1.2; 5 s: mean(0.1..2.0) = 1.05, final 2.0
    assert ade_fde(errors, T4, 3.0) == pytest.approx((0.65, 1.2))
    assert ade_fde(errors, T4, 5.0) == pytest.approx((1.05, 2.0))
    assert ade_fde(errors, T4, 2.9) is None
    assert ade_fde(errors[:4], T4[:4], 3.0) is None


def test_percentiles_linear() -> None:
    # [1, 2, 3, 4]: p50 at rank 1.5 -> 2.5; p90 at rank 2.7 -> 3.7; p99 at rank 2.97 -> 3.97
    assert percentiles([4.0, 1.0, 3.0, 2.0]) == pytest.approx({"p50": 2.5, "p90": 3.7, "p99": 3.97})
    assert percentiles([]) == {}


# ----------------------------------------------------------------------------- ST-P3


def test_stp3_template_is_32_cells() -> None:
    cells = stp3_ego_template(0.5)
    assert cells.shape == (32, 2)
    # Rows count 0.5 m cells from -49.75 m along the length: [0.5 - 2.042, 0.5 + 2.042] = [-1.542, 2.542] m
    # -> (x + 49.75) / 0.5 in [96.42, 104.58] -> 97 .. 104; columns across the width [-0.925, 0.925] -> 98 .. 101.
    assert sorted(set(cells[:, 0].tolist())) == list(range(97, 105))
    assert sorted(set(cells[:, 1].tolist())) == list(range(98, 102))
    # A boundary exactly on a cell centre counts (offset 0.292: -1.75 m -> index 96.0): 9 rows.
    assert len(set(stp3_ego_template(0.292)[:, 0].tolist())) == 9
    assert (EGO_LENGTH_M, EGO_WIDTH_M) == (4.084, 1.85)


def test_stp3_box_ahead_and_the_truncated_move() -> None:
    # Image pixels: row v = 100 - 2 f, column u = 100 - 2 l. The agent's corners f in [5, 7], l in [-1, 1]
    # are whole pixels: rows 86 .. 90, columns 98 .. 102, all drawn.
    ahead = box(6.0, 0.0, 2.0, 2.0)
    # Ego at f: footprint rows trunc(200 - (2 f + r)) for template rows r = 97 .. 104.
    # f = 2: rows 92 .. 99 (miss); f = 4: rows 88 .. 95 (hit on 88 .. 90)
    assert collisions_stp3([[2.0, 0.0], [4.0, 0.0]], [ahead, ahead]).tolist() == [False, True]
    # f = 2.4: trunc(195.2 - r) = 91 .. 98 (miss); f = 2.6: trunc(194.8 - r) = 90 .. 97 (hit on row 90)
    assert collisions_stp3([[2.4, 0.0], [2.6, 0.0]], [ahead, ahead]).tolist() == [False, True]


@pytest.mark.parametrize(("y", "hit"), [(2.3, False), (2.2, True), (-1.8, False), (-1.7, True)])
def test_stp3_box_beside_is_asymmetric_like_the_scripts(y: float, hit: bool) -> None:
    # Ego at the origin: columns trunc(0 + c) = 98 .. 101, i.e. l = 1.0 .. -0.5 (a quarter cell to the left).
    # Agent 4 m x 2 m beside it: columns [98 - 2 y, 102 - 2 y], corners rounded half to even.
    # y = 2.3: 102 - 4.6 = 97.4 -> 97 < 98 miss; y = 2.2: 97.6 -> 98 hit.
    # y = -1.8: 98 + 3.6 = 101.6 -> 102 > 101 miss; y = -1.7: 101.4 -> 101 hit.
    assert collisions_stp3([[0.0, 0.0]], [box(0.5, y, 4.0, 2.0)]).tolist() == [hit]


def test_stp3_clamps_the_footprint_onto_the_border_as_the_scripts_do() -> None:
    # Ego at f = 60: rows trunc(80 - r) < 0 -> clamped to row 0 (f = 50); columns 98 .. 101.
    # An agent at f in [58, 62] (rows -24 .. -16) draws nothing on the image -> no hit.
    assert collisions_stp3([[60.0, 0.0]], [box(60.0, 0.0, 4.0, 2.0)]).tolist() == [False]
    # An agent on the border, f in [49.25, 50.25] -> rows rint(-0.5) = 0 .. rint(1.5) = 2, columns 99 .. 101:
    # the clamped footprint meets it although the ego is 10 m away (the scripts' behaviour).
    assert collisions_stp3([[60.0, 0.0]], [box(49.75, 0.0, 1.0, 1.0)]).tolist() == [True]


def test_stp3_footprint_never_rotates() -> None:
    traj = [[0.0, 2.0], [0.0, 4.0]]  # heading left (pi/2)
    # At (0, 4): rows 96 .. 103 (f -1.5 .. 2.0), columns trunc(-8 + c) = 90 .. 93 (l 5.0 .. 3.5).
    front = box(0.0, 6.0, 0.6, 0.6)  # l in [5.7, 6.3] -> columns 87 .. 89: only a rotated footprint reaches it
    side = box(2.0, 4.0, 1.0, 1.0)  # f in [1.5, 2.5] -> rows 95 .. 97, columns 91 .. 93: only the unrotated one
    assert collisions_stp3(traj, [front, front]).tolist() == [False, False]
    assert collisions_stp3(traj, [side, side]).tolist() == [False, True]
    assert collisions_bev_planner(traj, [front, front]).tolist() == [False, True]
    assert collisions_bev_planner(traj, [side, side]).tolist() == [False, False]


def test_opencv_line_and_fill_rules() -> None:
    from blockpilot.eval.stp3_grid import line_pixels, polygon_pixels

    # 8-connected line (0, 0) -> (10, 3): err = 10 - 6 = 4, then -6 per column, +20 on a diagonal step
    # (err < 0 before the step): diagonals after columns 1, 5 and 8.
    assert line_pixels(0, 0, 10, 3) == [(0, 0), (0, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 6), (2, 7), (2, 8),
                                        (3, 9), (3, 10)]
    assert line_pixels(10, 3, 0, 0) == line_pixels(0, 0, 10, 3)  # always drawn left to right
    # A diamond with corners 5 pixels from (10, 10): exactly the pixels with |u - 10| + |v - 10| <= 5.
    diamond = polygon_pixels([[10, 5], [15, 10], [10, 15], [5, 10]])
    assert diamond == {(v, u) for v in range(5, 16) for u in range(5, 16) if abs(u - 10) + abs(v - 10) <= 5}


def test_stp3_empty_boxes_and_mismatch() -> None:
    assert collisions_stp3([[1.0, 0.0]], [np.zeros((0, 5))]).tolist() == [False]
    with pytest.raises(ValueError):
        collisions_stp3([[1.0, 0.0]], [])


# ----------------------------------------------------------------------------- BEV-Planner


def test_trajectory_headings() -> None:
    # steps of 0.5 m and |(0.5, 0.2)| = 0.54 m are under 1 m -> 0
    assert trajectory_headings([[0.5, 0.0], [1.0, 0.2]]).tolist() == [0.0, 0.0]
    np.testing.assert_allclose(trajectory_headings([[0.0, 2.0], [0.0, 4.0]]), [math.pi / 2] * 2)
    # (3, 0) from the origin -> 0; 0.5 m step -> 0; (0, 2) step -> pi/2; a 2 m step backwards -> pi
    np.testing.assert_allclose(trajectory_headings([[3.0, 0.0], [3.5, 0.0], [3.5, 2.0], [1.5, 2.0]]),
                               [0.0, 0.0, math.pi / 2, math.pi])


def test_bev_planner_footprint_size_and_offset() -> None:
    # x centres -1.45 .. 2.45 inside [-1.542, 2.542] (40), y centres -0.85 .. 0.85 inside +-0.925 (18)
    assert len(bev_planner_footprint((0.0, 0.0), 0.0)) == 40 * 18
    traj = [[0.0, 2.0], [0.0, 4.0]]  # heading pi/2 at both steps; the box front reaches y = 4 + 0.5 + 2.042 = 6.542
    near = box(0.0, 6.45, 0.15, 0.15)  # holds only the centre y = 6.45 -> inside
    far = box(0.0, 6.6, 0.15, 0.15)  # holds centres 6.55, 6.65 -> beyond 6.542
    assert collisions_bev_planner(traj, [near, near]).tolist() == [False, True]
    assert collisions_bev_planner(traj, [far, far]).tolist() == [False, False]
    # without the 0.5 m offset the front is at 6.042 -> no hit
    assert collisions_bev_planner(traj, [near, near], box_offset_m=0.0).tolist() == [False, False]


def test_bev_planner_rotated_agent_and_slow_heading() -> None:
    # Agent 4 x 1 m at (0.5, 2.0) turned 90 degrees: spans x in [0, 1], y in [0, 4] -> it overlaps the ego box.
    agent = box(0.5, 2.0, 4.0, 1.0, yaw=math.pi / 2)
    assert collisions_bev_planner([[0.3, 0.0]], [agent]).tolist() == [True]
    # |(0.3, 0.6)| = 0.67 m < 1 m keeps heading 0: the ego spans y up to 0.6 + 0.925 = 1.525, clear of y >= 1.6
    # (turned to atan2(0.6, 0.3) = 63 degrees it would cover (0.5, 2.0): along 0.84 <= 2.042, across 0.44 <= 0.925).
    clear = box(0.5, 2.0, 0.8, 1.0)  # y in [1.6, 2.4]
    assert collisions_bev_planner([[0.3, 0.6]], [clear]).tolist() == [False]


# ----------------------------------------------------------------------------- WOD-E2E rater feedback score


def shifted(steps: dict[int, tuple[float, float]], base: np.ndarray = STRAIGHT) -> np.ndarray:
    out = base.copy()
    for s, d in steps.items():
        out[s] += d
    return out


def test_rfs_thresholds_and_scale() -> None:
    assert rfs_horizons(5.0) == (3.0, 5.0)
    assert rfs_horizons(3.0) == (3.0,)
    assert rfs_horizons(4.0) == (3.0, 4.0)
    assert rfs_horizons(2.0) == (2.0,)
    assert rfs_horizons(8.0) == (3.0, 5.0, 8.0)
    # 0.5 + 0.5 * (v - 1.4) / 9.6: v = 0 -> 0.354 -> 0.5; v = 6.2 -> 0.75; v = 11 -> 1.0; v = 20 -> 1.0
    assert [rfs_speed_scale(v) for v in (0.0, 6.2, 11.0, 20.0)] == pytest.approx([0.5, 0.75, 1.0, 1.0])
    lat, lng = rfs_thresholds((3.0, 4.0, 5.0, 8.0), 11.0)
    assert lat.tolist() == pytest.approx([1.0, 1.4, 1.8, 1.8])
    assert lng.tolist() == pytest.approx([4.0, 5.6, 7.2, 7.2])


def test_rfs_inside_scores_rater_score() -> None:
    res = rater_feedback_score(STRAIGHT, [(STRAIGHT, 10.0)], 11.0)
    assert isinstance(res, RfsResult)
    assert (res.score, res.within_trust_region, res.horizons_s) == (10.0, True, (3.0, 5.0))
    assert res.per_horizon == {3.0: 10.0, 5.0: 10.0}
    assert res.to_dict() == {"score": 10.0, "per_horizon": {"3": 10.0, "5": 10.0}, "in_trust_region": True}
    # 0.9 m lateral and 3.9 m longitudinal at 3 s stay inside (r = 0.9 and 0.975)
    res = rater_feedback_score(shifted({11: (3.9, 0.9)}), [(STRAIGHT, 8.0)], 11.0)
    assert (res.score, res.within_trust_region) == (8.0, True)


def test_rfs_outside_laterally() -> None:
    # 3 s: lateral 2 m / 1.0 m -> r = 2 -> 10 * 0.1 ** 1 = 1; 5 s exact -> 10; mean 5.5 (> 4, no floor)
    res = rater_feedback_score(shifted({11: (0.0, 2.0)}), [(STRAIGHT, 10.0)], 11.0)
    assert res.per_horizon == pytest.approx({3.0: 1.0, 5.0: 10.0})
    assert (res.score, res.within_trust_region) == (pytest.approx(5.5), False)
    # also 2.7 m at 5 s: r = 2.7 / 1.8 = 1.5 -> 10 * 0.1 ** 0.5 = 3.1623; mean 2.0811 -> floor 4
    res = rater_feedback_score(shifted({11: (0.0, 2.0), 19: (0.0, -2.7)}), [(STRAIGHT, 10.0)], 11.0)
    assert res.per_horizon == pytest.approx({3.0: 1.0, 5.0: 10 / math.sqrt(10)})
    assert res.score == 4.0


def test_rfs_outside_longitudinally() -> None:
    # 3 s: 6 m along x / 4 m -> r = 1.5 -> 10 * 0.1 ** 0.5 = 3.1623; 5 s exact -> 10; mean 6.5811
    res = rater_feedback_score(shifted({11: (6.0, 0.0)}), [(STRAIGHT, 10.0)], 11.0)
    assert res.score == pytest.approx((10 / math.sqrt(10) + 10) / 2)
    assert not res.within_trust_region


def test_rfs_low_speed_shrinks_thresholds() -> None:
    pred = shifted({11: (0.0, 0.6)})
    # v = 11: threshold 1.0 m -> inside, 10
    assert rater_feedback_score(pred, [(STRAIGHT, 10.0)], 11.0).score == 10.0
    # v = 0: k = 0.5, threshold 0.5 m -> r = 1.2 -> 10 * 0.1 ** 0.2 = 6.3096; mean with 10 -> 8.1548
    res = rater_feedback_score(pred, [(STRAIGHT, 10.0)], 0.0)
    assert res.score == pytest.approx((10 * 0.1**0.2 + 10) / 2)
    assert not res.within_trust_region


def test_rfs_far_away_is_floored() -> None:
    # 50 m lateral: r = 50 at 3 s and 27.8 at 5 s -> ~0 per horizon -> floor 4
    res = rater_feedback_score(STRAIGHT + np.array([0.0, 50.0]), [(STRAIGHT, 10.0)], 11.0)
    assert res.score == 4.0 and res.per_horizon[3.0] < 1e-20


def test_rfs_max_over_raters() -> None:
    far = STRAIGHT + np.array([0.0, 30.0])
    # the 10-rated rater is 30 m away (~0); the 6-rated one matches -> 6 at each horizon, within, no floor
    res = rater_feedback_score(STRAIGHT, [(far, 10.0), (STRAIGHT, 6.0)], 11.0)
    assert (res.score, res.within_trust_region) == (6.0, True)
    assert res.per_horizon == {3.0: 6.0, 5.0: 6.0}
    # a 2-rated exact match is within the trust region, so the floor of 4 does not apply
    assert rater_feedback_score(STRAIGHT, [(STRAIGHT, 2.0)], 11.0).score == 2.0


def test_rfs_rater_padding_and_truncation() -> None:
    # one rater, given as a RatedTrajectory, is repeated to three: same answer
    assert rater_feedback_score(STRAIGHT, [RatedTrajectory(xy=STRAIGHT, score=7.0)], 11.0).score == 7.0
    # only the first three raters count: the exact 10-rated fourth is dropped -> three far 5-rated -> floor 4
    far = STRAIGHT + np.array([0.0, 30.0])
    assert rater_feedback_score(STRAIGHT, [(far, 5.0)] * 3 + [(STRAIGHT, 10.0)], 11.0).score == 4.0
    # a 3 s rater (12 points) is padded with its last point (30, 0): a prediction stopping there scores 10
    stopped = STRAIGHT.copy()
    stopped[12:] = [30.0, 0.0]
    assert rater_feedback_score(stopped, [(STRAIGHT[:12], 10.0)], 11.0).score == 10.0


def test_rfs_length_3s() -> None:
    res = rater_feedback_score(shifted({11: (0.0, 0.9)})[:12], [(STRAIGHT, 10.0)], 11.0)
    # 12 points at 4 Hz -> 3 s, single horizon 3 s; raters cut to 12 points; 0.9 m < 1.0 m -> 10
    assert (res.horizons_s, res.score, res.per_horizon) == ((3.0,), 10.0, {3.0: 10.0})
    # with length_s=3 a 20-point prediction only counts its 3 s point, so a 5 s error does not matter
    assert rater_feedback_score(shifted({19: (0.0, 9.0)}), [(STRAIGHT, 10.0)], 11.0, length_s=3).score == 10.0
    with pytest.raises(ValueError, match="pred has 12 points"):
        rater_feedback_score(STRAIGHT[:12], [(STRAIGHT, 10.0)], 11.0, length_s=5)


def test_rfs_zero_displacement_directions() -> None:
    # a rater that never moves: every displacement is zero -> direction (1, 0) throughout
    still = np.zeros((20, 2))
    np.testing.assert_allclose(rater_directions(still), [[1.0, 0.0]] * 20)
    assert rater_feedback_score(shifted({11: (3.9, 0.0)}, still), [(still, 10.0)], 11.0).score == 10.0
    assert not rater_feedback_score(shifted({11: (0.0, 1.1)}, still), [(still, 10.0)], 11.0).within_trust_region
    # moving left 4 m/s for 3 s, then stopped at (0, 12): at 5 s the direction stays (0, 1)
    left = np.stack([np.zeros(20), 4.0 * np.minimum(T4, 3.0)], axis=1)
    np.testing.assert_allclose(rater_directions(left)[19], [0.0, 1.0])
    # 7 m further along y at 5 s is longitudinal: 7 / 7.2 -> inside; 1.9 m along x is lateral: 1.9 / 1.8 -> outside
    assert rater_feedback_score(shifted({19: (0.0, 7.0)}, left), [(left, 10.0)], 11.0).within_trust_region
    assert not rater_feedback_score(shifted({19: (1.9, 0.0)}, left), [(left, 10.0)], 11.0).within_trust_region


def test_rfs_validation() -> None:
    with pytest.raises(ValueError, match="no rater"):
        rater_feedback_score(STRAIGHT, [], 11.0)
    with pytest.raises(ValueError, match="non-finite"):
        rater_feedback_score(STRAIGHT + np.array([np.nan, 0.0]), [(STRAIGHT, 10.0)], 11.0)
    with pytest.raises(ValueError, match="whole number"):
        rater_feedback_score(STRAIGHT[:18], [(STRAIGHT, 10.0)], 11.0)
    with pytest.raises(ValueError):
        rater_feedback_score(STRAIGHT, [(STRAIGHT, float("nan"))], 11.0)


def test_trust_regions_for_plots() -> None:
    left = np.stack([np.zeros(20), 4.0 * np.minimum(T4, 3.0)], axis=1)
    regions = trust_regions([(STRAIGHT, 10.0), (left, 5.0)], 11.0)
    assert [(r.rater, r.horizon_s) for r in regions] == [(0, 3.0), (0, 5.0), (1, 3.0), (1, 5.0)]
    r0 = regions[0]  # (30, 0) heading 0, 4 m along, 1 m across
    assert (r0.centre, r0.heading_rad, r0.half_lng_m, r0.half_lat_m) == ((30.0, 0.0), 0.0, 4.0, 1.0)
    r3 = regions[3]  # (0, 12) heading pi/2 (kept while stopped), 7.2 m along, 1.8 m across
    assert r3.centre == (0.0, 12.0) and r3.heading_rad == pytest.approx(math.pi / 2)
    assert (r3.half_lng_m, r3.half_lat_m) == pytest.approx((7.2, 1.8))
