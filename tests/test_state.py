"""The loop's state types and their files: history.json and training_state.json keep the formats they had."""

import json

from attrclf.state import EPOCH_COLUMNS, OPTIONAL_COLUMNS, BestEpoch, EpochRecord, History, RunState

# training_state.json's loop part as engine.py wrote it before the state had types (new_run_state's dict after two
# epochs, the second with a decode failure): checkpoints written then must still resume
OLD_RUN = {
    "epoch": 2, "step": 6, "since_best": 1, "stop": None, "seconds": 12.5, "decode_failures": {"x.png": 1},
    "history": {
        "iterations": {"step": [1, 2, 3, 4, 5, 6], "epoch": [1, 1, 1, 2, 2, 2],
                       "loss": [0.9, 0.8, 0.7, 0.65, 0.6, 0.62]},
        "epochs": {"epoch": [1, 2], "stage": ["head", "finetune"], "train_loss": [0.8, 0.62], "val_loss": [0.7, 0.66],
                   "val_mAP": [0.5, None], "lr_head": [0.002, 0.0019], "lr_backbone": [0.0, 0.0001],
                   "seconds": [6.1, 6.4], "bad_images": [0, 1]},
    },
}


def test_old_training_state_loads_and_writes_back_the_same():
    saved = {**OLD_RUN, "fingerprint": "abc", "world_size": 1, "batch_size": 8, "train_config": {},
             "best": {"score": 0.5, "epoch": 1, "val_loss": 0.7}}
    run = RunState.from_dict(json.loads(json.dumps(saved)))
    assert (run.epoch, run.step, run.since_best, run.stop, run.seconds) == (2, 6, 1, None, 12.5)
    assert run.decode_failures == {"x.png": 1} and run.history.best_epoch is None
    assert run.history.epochs[1] == EpochRecord(epoch=2, stage="finetune", train_loss=0.62, val_loss=0.66,
                                                val_mAP=None, lr_head=0.0019, lr_backbone=0.0001, seconds=6.4,
                                                bad_images=1)
    assert run.to_dict() == OLD_RUN
    assert json.loads(json.dumps(run.to_dict())) == OLD_RUN


def test_history_json_form_and_round_trip():
    history = History()
    run = RunState(history=history)
    for step, loss in ((1, 0.5), (2, 0.25)):
        run.step = step
        run.record_step(0, loss)
    history.epochs.append(EpochRecord(epoch=1, stage="head", train_loss=0.375, val_loss=0.4, val_mAP=0.75,
                                      lr_head=0.01, lr_backbone=0.0, seconds=1.5, bad_images=0))
    assert history.to_dict() == {"iterations": {"step": [1, 2], "epoch": [1, 1], "loss": [0.5, 0.25]},
                                 "epochs": {"epoch": [1], "stage": ["head"], "train_loss": [0.375], "val_loss": [0.4],
                                            "val_mAP": [0.75], "lr_head": [0.01], "lr_backbone": [0.0],
                                            "seconds": [1.5], "bad_images": [0]}}
    history.best_epoch = 1
    saved = json.loads(json.dumps(history.to_dict()))
    assert saved["best_epoch"] == 1
    assert list(saved["epochs"]) == [c for c in EPOCH_COLUMNS if c not in OPTIONAL_COLUMNS]  # no weight average here
    assert History.from_dict(saved) == history


def test_best_epoch_summary_is_what_the_state_file_records():
    best = BestEpoch(score=0.5, epoch=3, val_loss=0.7, state={}, probs=None, targets=None, mask=None)
    assert best.summary() == {"score": 0.5, "epoch": 3, "val_loss": 0.7, "weights": "raw"}
    # a checkpoint written before the weight average records no "weights": it reads as the raw weights
    assert BestEpoch(**{"score": 0.5, "epoch": 3, "val_loss": 0.7}, state={}, probs=None, targets=None,
                     mask=None).weights == "raw"


def test_the_weight_average_column_is_written_and_read_back_when_there_is_one():
    history = History()
    history.epochs.append(EpochRecord(epoch=1, stage="head", train_loss=0.5, val_loss=0.4, val_mAP=0.75, lr_head=0.01,
                                      lr_backbone=0.0, seconds=1.5, bad_images=0, val_mAP_ema=0.8))
    saved = json.loads(json.dumps(history.to_dict()))
    assert list(saved["epochs"]) == list(EPOCH_COLUMNS) and saved["epochs"]["val_mAP_ema"] == [0.8]
    assert History.from_dict(saved) == history


def test_an_annealing_runs_state_round_trips_and_others_write_no_anneal():
    """A checkpoint written during --early-stop-anneal's epochs resumes the same bend of the schedule."""
    run = RunState(epoch=7, step=70, since_best=2, anneal={"step": 70, "epoch": 7, "epochs": 3})
    saved = json.loads(json.dumps(run.to_dict()))
    assert saved["anneal"] == {"step": 70, "epoch": 7, "epochs": 3}
    assert RunState.from_dict(saved).anneal == run.anneal
    assert "anneal" not in RunState().to_dict() and RunState.from_dict(RunState().to_dict()).anneal is None
