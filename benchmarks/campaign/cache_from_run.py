"""Write the jdft2d exfoliation group cache from a run of matxfer.physics.exfoliation's own
exfoliation_values on every row (same settings as the cache key: relax none, float32,
dispersion on; same code: checked by the commit of exfoliation.py / dispersion.py), after
checking that the run's rows are the cache's rows in the same order.
usage: cache_from_run.py VALUES.npy"""
import gzip
import json
import sys

import numpy as np
from pymatgen.core import Structure

from matxfer.config import DataConfig, ModelConfig
from matxfer.datasets.loading import stream_rows
from matxfer.graphs import cache_file
from matxfer.model import build_model
from matxfer.physics.cache import descriptor_file, group_names, save_group
from matxfer.physics.config import PhysicsConfig
from matxfer.physics.potential import frame_of

x = np.load(sys.argv[1])
physics = PhysicsConfig(descriptors=group_names("exfoliation"))
model = ModelConfig(source="small", physics=physics)
data = DataConfig(task="matbench_jdft2d")
rows = json.load(gzip.open("../shared/data/matbench/matbench_jdft2d.json.gz"))["data"]
ids = []
for k, (row_id, structure, _) in enumerate(stream_rows(data, [])):
    a, b = frame_of(structure), frame_of(Structure.from_dict(rows[k][0]))
    assert np.array_equal(a.numbers, b.numbers) and np.allclose(a.positions, b.positions)
    ids.append(str(row_id))
assert len(ids) == len(x) == len(rows)
path = descriptor_file(cache_file(data, build_model(model).graph_spec()), model, physics,
                       "exfoliation")
save_group(path, ids, "exfoliation", x[:, None])
print("saved", path, "finite", int(np.isfinite(x).sum()))
