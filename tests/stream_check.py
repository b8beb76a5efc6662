"""Run by test_streaming.py under `accelerate launch --num_processes 2`: one pass of each process's training stream.

Each process reads its share of the shards (split_dataset_by_node) through `StreamLoader.rows`, the stream its
batches are drawn from, until its first pass ends; the main process writes every process's row names to a JSON file.
"""

import json
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from attrclf.config import TrainConfig
from attrclf.streaming import prepare_stream, stream_loader


def main(shards: str, out: str) -> None:
    accelerator = Accelerator()
    cfg = TrainConfig(data=shards, max_steps=1, val_rows=30, stats_rows=20, shuffle_buffer=16, batch_size=4,
                      num_workers=0, backbone="test_resnet", pretrained=False, image_size=32).resolve()
    data = prepare_stream(cfg)
    loader = stream_loader(data, None, cfg, accelerator)
    names = []
    for passes, row in loader.rows():
        if passes > 0:
            break
        names.append(row["image_name"])
    every = gather_object([names])
    if accelerator.is_main_process:
        Path(out).write_text(json.dumps({"world_size": accelerator.num_processes, "names": every,
                                         "validation": list(data.validation["image_name"]),
                                         "train_shards": len(data.stream.train_shards)}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
