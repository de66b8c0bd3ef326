"""The sample order: independent of world size and workers, epochs rolling over, exact mixing quotas."""
import pytest

from shardflow.storage import Storage
from shardflow.train.config import DatasetSpec
from shardflow.train.data import build_loader

from .conftest import Ranks, loader_cfg, reference_stream, write_dataset


def test_order_is_independent_of_world_and_workers_and_epochs_roll_over(ds250):
    storage, expect = ds250
    cfg = loader_cfg()
    ref = reference_stream(storage, cfg, 632, expect)  # 2.5 epochs of 250; 632 = 79 steps of 8 at world 2
    for e in range(2):  # each epoch delivers every sample once, in a new order
        assert sorted(i for _, i in ref[e * 250 : (e + 1) * 250]) == list(range(250))
    assert ref[:250] != ref[250:500]
    assert ref[:250] != [(0, i) for i in range(250)]  # shuffled
    for world, workers, group in [(2, 0, 2), (1, 2, 1), (2, 2, 3), (3, 1, None), (1, 0, None)]:
        run = Ranks(storage, loader_cfg(num_workers=workers, group_batches=group), world, expect=expect)
        got = run.steps(-(-632 // (4 * world)))
        run.close()
        assert got[:632] == ref, (world, workers, group)


def test_mixing_proportions_and_resume(tmp_path):
    a, b = Storage(str(tmp_path / "a")), Storage(str(tmp_path / "b"))
    expect = {1: write_dataset(a, 250, tag=1), 2: write_dataset(b, 90, tag=2, rows_per_member=8)}
    cfg = loader_cfg(datasets=[DatasetSpec(root=a.root, weight=3), DatasetSpec(root=b.root, weight=1)])
    run = Ranks(a, cfg, 1, expect=expect)
    ref = run.steps(200)
    run.close()
    tags = [t for t, _ in ref]
    assert tags.count(1) == 600 and tags.count(2) == 200  # quotas 3:1 are exact per period of 4
    assert all(tags[i : i + 4].count(2) == 1 for i in range(0, 800, 4))  # and spread evenly
    for tag, n in ((1, 250), (2, 90)):  # each dataset walks its own epochs
        mine = [i for t, i in ref if t == tag]
        assert sorted(mine[:n]) == list(range(n)) and sorted(mine[n : 2 * n]) == list(range(n))
    run = Ranks(a, cfg.model_copy(update={"num_workers": 1}), 2, expect=expect)
    got = run.steps(37)
    state = run.state()
    run.close()
    assert state["datasets"][0]["consumed"] == sum(1 for t, _ in got if t == 1)
    assert state["datasets"][1]["epoch"] == sum(1 for t, _ in got if t == 2) // 90
    run = Ranks(a, cfg, 1, state=state, expect=expect)
    got += run.steps((800 - len(got)) // 4)
    run.close()
    assert got == ref

    fractional = cfg.model_copy(update={"datasets": [DatasetSpec(root=a.root, weight=0.7), DatasetSpec(root=b.root, weight=0.3)]})
    run = Ranks(a, fractional, 1)
    tags = [t for t, _ in run.steps(500)]
    run.close()
    assert abs(tags.count(1) / len(tags) - 0.7) < 0.005
    with pytest.raises(ValueError, match="another sample order"):
        build_loader(fractional, a).load_state_dict(state)
