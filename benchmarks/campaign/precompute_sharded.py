"""Fill one descriptor group's cache of a Matbench task with K single-thread processes, each
running matxfer's own describe() on an interleaved shard of the rows; the shards are joined in
row order and saved through matxfer.physics.cache.save_group under the key matxfer computes.
usage: precompute_sharded.py TASK GROUP K"""
import multiprocessing as mp
import sys
import time

import numpy as np


def shard(args):
    import torch
    torch.set_num_threads(1)
    from matxfer.config import ModelConfig
    from matxfer.physics.cache import potential_of
    from matxfer.physics.descriptors import describe
    frames, everything_json, k = args
    from matxfer.physics.config import PhysicsConfig
    everything = PhysicsConfig.model_validate_json(everything_json)
    pot = potential_of(ModelConfig(), everything)
    t = time.time()
    done = [0]
    def tick(n):
        done[0] += n
        print(f"shard {k}: {done[0]}/{len(frames)} {time.time() - t:.0f}s", flush=True)
    return describe(frames, pot, everything, tick)


def main():
    from matxfer.config import DataConfig, ModelConfig, derive
    from matxfer.datasets.loading import stream_rows
    from matxfer.graphs import cache_file
    from matxfer.model import build_model
    from matxfer.physics.cache import descriptor_file, group_names, save_group
    from matxfer.physics.config import PhysicsConfig
    from matxfer.physics.potential import frame_of
    task, group, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    names = group_names(group)
    physics = PhysicsConfig(descriptors=names)
    model = ModelConfig(source="small", physics=physics)
    data = DataConfig(task=task)
    graph_file = cache_file(data, build_model(model).graph_spec())
    path = descriptor_file(graph_file, model, physics, group)
    everything = derive(physics, {"descriptors": names, "mode": "off"})
    ids, frames = [], []
    for row_id, structure, _ in stream_rows(data, []):
        ids.append(str(row_id))
        frames.append(frame_of(structure))
    t = time.time()  # interleaved shards (rows i, i+k, ...): the row order is not by size
    with mp.get_context("spawn").Pool(k) as pool:
        parts = pool.map(shard, [(frames[i::k], everything.model_dump_json(), i)
                                 for i in range(k)])
    values = np.full((len(frames), len(names)), np.nan)
    for i, part in enumerate(parts):
        values[i::k] = part
    save_group(path, ids, group, values)
    print(f"saved {path} ({len(ids)} rows, {time.time() - t:.0f}s); NaN per column:",
          np.isnan(values).sum(axis=0).tolist(), flush=True)


if __name__ == "__main__":
    main()
