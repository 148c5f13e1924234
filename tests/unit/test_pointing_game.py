"""The pointing game of the demo model's explanation maps (demo/pointing_game.py): the cell geometry, and
the hit rates the demo model actually reaches on held-out synthetic positives."""

from __future__ import annotations

import numpy as np
import pytest

from demo import pointing_game
from headct.model_card import MODEL_CARD_FILENAME
from tests.stack import MODEL_NAME, REPOSITORY

EYE = np.eye(4)


def _one_voxel(index: tuple[int, int, int], shape: tuple[int, int, int] = (120, 120, 120)) -> np.ndarray:
    lesion = np.zeros(shape, bool)
    lesion[index] = True
    return lesion


def test_a_cell_covers_its_share_of_the_crop() -> None:
    # Crop [10, 106) per axis: 96 voxels -> 12 per cell; voxel 30 lies in cell (30 - 10) // 12 = 1.
    cells = pointing_game.lesion_cells(
        _one_voxel((30, 59, 105)), EYE, EYE, (10, 10, 10), (106, 106, 106), 8, (1, 1, 1), dilation_mm=0.0
    )
    assert np.argwhere(cells).tolist() == [[1, 4, 7]]
    # A 48-voxel crop: each cell is 6 voxels of the 1 mm grid (the area resize stretches it 2x).
    cells = pointing_game.lesion_cells(
        _one_voxel((30, 30, 30)), EYE, EYE, (0, 0, 0), (48, 48, 48), 8, (1, 1, 1), dilation_mm=0.0
    )
    assert np.argwhere(cells).tolist() == [[5, 5, 5]]


def test_dilation_reaches_neighbouring_cells_and_affines_are_followed() -> None:
    # Voxel 23 is 1 mm from the edge between cells 1 and 2 (at 24): 5 mm of dilation crosses it.
    cells = pointing_game.lesion_cells(
        _one_voxel((23, 42, 42)), EYE, EYE, (0, 0, 0), (96, 96, 96), 8, (1, 1, 1), dilation_mm=5.0
    )
    assert sorted({tuple(c) for c in np.argwhere(cells)}) == [(1, 3, 3), (2, 3, 3)]
    # The scan stored with axis 0 flipped (x -> 95 - x): the same physical voxel, the same cell.
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = 95.0
    cells = pointing_game.lesion_cells(
        _one_voxel((95 - 30, 40, 40), (96, 96, 96)), flipped, EYE, (0, 0, 0), (96, 96, 96), 8, (1, 1, 1), 0.0
    )
    assert np.argwhere(cells).tolist() == [[2, 3, 3]]


# Measured on the demo model (build/demo/checkpoints, `make demo`) with the first 20 held-out cases per
# task: hemorrhage 20/20 and edema 18/20 (cases 9 and 17 miss) where it was first trained. The demo is
# trained afresh on each machine and float rounding differs between CPUs: an AMD EPYC host's model got
# 20/20 and 17/20 (with 10 cases its edema 8/10 fell below the target by sampling alone). Floors, then,
# one case below the first machine's; the target rate holds on both.
EXPECTED_HITS = {"hemorrhage": 19, "edema": 17}
CASES = 20


@pytest.mark.skipif(
    not (REPOSITORY / MODEL_NAME / MODEL_CARD_FILENAME).is_file(),
    reason="demo model not exported (make demo)",
)
def test_demo_model_pointing_game_hit_rates() -> None:
    scores = pointing_game.run(REPOSITORY, MODEL_NAME, cases=CASES)
    print(pointing_game.summary(scores))
    hits = {task: score.hits for task, score in scores.items()}
    assert hits.keys() == EXPECTED_HITS.keys()
    assert all(hits[task] >= floor for task, floor in EXPECTED_HITS.items()), hits
    for score in scores.values():
        assert score.rate >= pointing_game.TARGET_HIT_RATE
