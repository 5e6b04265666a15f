"""L2W's behaviour is pinned: tiny float64 models after a few L2W steps (several option sets,
ablations included, SGD and Adam) must keep the weights the code had at commit bb5e0a5."""

from pathlib import Path

import numpy as np
import pytest
from l2w_pinned import all_cases, trained_weights

FIXTURE = Path(__file__).parent / "data" / "l2w_pinned.npz"


@pytest.mark.parametrize("case, options, optimizer", list(all_cases()), ids=[c[0] for c in all_cases()])
def test_l2w_weights_match_the_pinned_fixture(case, options, optimizer):
    with np.load(FIXTURE) as pinned:
        want = {k.split("/", 1)[1]: pinned[k] for k in pinned.files if k.startswith(case + "/")}
    got = trained_weights(options, optimizer)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-12, err_msg=f"{case} variable {key}")
