"""RELION's own programs read the maps omlrelion writes."""

import re
import subprocess

import numpy as np
import pytest

from omlrelion.io.mrc import write_map


@pytest.mark.relion
def test_relion_image_handler_stats_of_our_map(tmp_path, rng):
    volume = rng.normal(size=(32, 32, 32)).astype(np.float32) * 3 + 1
    path = tmp_path / "ours.mrc"
    write_map(path, volume, 1.25)
    out = subprocess.run(["relion_image_handler", "--i", str(path), "--stats"], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"\(x,y,z,n\)= (\d+) x (\d+) x (\d+) x (\d+) ; avg= (\S+) stddev= (\S+) minval= (\S+) "
                  r"maxval= (\S+); angpix = (\S+)", out)
    assert m, out
    assert tuple(int(g) for g in m.groups()[:4]) == (32, 32, 32, 1)
    avg, std, vmin, vmax, angpix = (float(g) for g in m.groups()[4:])
    assert avg == pytest.approx(volume.mean(), rel=1e-4, abs=1e-5)
    assert std == pytest.approx(volume.std(), rel=1e-4)
    assert (vmin, vmax) == pytest.approx((volume.min(), volume.max()), rel=1e-5)
    assert angpix == pytest.approx(1.25)
