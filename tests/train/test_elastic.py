"""The gradient accumulation a resume on another world size needs to keep the global batch."""
import pytest

from shardflow.train.elastic import BatchPlan, GlobalBatchError, resume_grad_accum

SAVED = BatchPlan(batch_size=4, grad_accum=2, world_size=2)  # 16 sequences per step


def test_fewer_or_more_ranks_change_the_accumulation():
    accum, note = resume_grad_accum(SAVED, 4, 2, 1)
    assert accum == 4 and "grad_accum 2 -> 4" in note and "16 sequences" in note
    assert resume_grad_accum(SAVED, 4, 2, 4)[0] == 1
    assert resume_grad_accum(SAVED, 2, 2, 4) == (2, None)  # another batch size already gives 16: nothing to say


def test_same_world_size_or_no_record_or_opt_out_keeps_the_config():
    assert resume_grad_accum(SAVED, 4, 7, 2) == (7, None)  # the user's choice on the same world
    assert resume_grad_accum(None, 4, 2, 1) == (2, None)  # a checkpoint from before the record
    assert resume_grad_accum(SAVED, 4, 2, 1, keep_global_batch=False) == (2, None)


def test_impossible_splits_are_refused_with_what_to_set():
    with pytest.raises(GlobalBatchError) as e:
        resume_grad_accum(SAVED, 3, 2, 1)
    msg = str(e.value)
    assert "16 sequences (4 per rank x 2 accumulated x 2 ranks)" in msg
    assert "train.data.batch_size=4 (grad_accum 4)" in msg and "keep_global_batch=false" in msg
    with pytest.raises(GlobalBatchError, match=r"run on a world size that divides 16"):
        resume_grad_accum(SAVED, 4, 2, 3)
    with pytest.raises(GlobalBatchError, match=r"set train.data.batch_size=1 \(grad_accum 8\) or "
                       r"train.data.batch_size=2 \(grad_accum 4\) or train.data.batch_size=4 \(grad_accum 2\);"):
        resume_grad_accum(BatchPlan(8, 2, 2), 3, 2, 4)  # 32 per step on 4 ranks: 8 per rank, not a multiple of 3


def test_plan_round_trips_through_meta_json():
    assert BatchPlan.from_json(SAVED.to_json()) == SAVED and SAVED.to_json()["global_batch"] == 16
    assert BatchPlan.from_json(None) is None
