"""The pre-pass on 8 (fake CPU) devices gives the same table as on 1 device. Own processes."""

from __future__ import annotations

import numpy as np
import pytest

from . import _data, _subprocess


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return _subprocess.run(
        str(tmp_path_factory.mktemp("one") / "t.npz"), "--devices", "1"
    )


CASES = {
    "8dev": "--devices 8 --batch-size 16",
    "8dev-uneven-batch": "--devices 8 --batch-size 13",  # 13 rows per step: padded to 16
    "4x2-mesh": "--devices 8 --batch-size 16 --model-axis 2",  # ('data': 4, 'model': 2)
    "sharded-params": "--devices 8 --batch-size 16 --shard-params",  # w1 columns over 8
}


@pytest.mark.slow
@pytest.mark.parametrize("args", [a.split() for a in CASES.values()], ids=list(CASES))
def test_eight_devices_equal_one_device(one_device, tmp_path, args):
    table = _subprocess.run(str(tmp_path / "t.npz"), *args)
    np.testing.assert_array_equal(table.ids, one_device.ids)
    # Ids exactly; losses to float32 rounding (per-device shapes change XLA's matmul
    # kernels, and a squared residual near 0 shows that rounding as a relative error).
    np.testing.assert_allclose(table.losses, one_device.losses, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(np.sort(_data.dataset()["id"]), table.ids)
