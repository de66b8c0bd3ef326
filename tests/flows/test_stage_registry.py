"""dataprep/stages.py: the stage list of a config, and CLI names resolved against it."""
from __future__ import annotations

import pytest

from shardflow.dataprep.config import PrepConfig
from shardflow.dataprep.stages import STAGE_GROUPS, build_stages, group_of, load_factory, select_stages

from .conftest import FACTORY


def names(stages):
    return [s.name for s in stages]


def test_build_stages_is_the_pipeline_in_order():
    stages = build_stages(PrepConfig())
    assert names(stages) == [n for group in STAGE_GROUPS.values() for n in group]
    for s in stages:
        assert isinstance(s.config_digest(), str) and callable(s.shards) and callable(s.process)


def test_cli_names_resolve_to_their_stages():
    stages = build_stages(PrepConfig())
    assert names(select_stages(stages, "dedup")) == ["dedup_signatures", "dedup_buckets", "dedup_clusters", "dedup"]
    assert names(select_stages(stages, "tokenize")) == ["tokenize", "pack"]
    assert names(select_stages(stages, ["pack", "clean"])) == ["clean", "pack"]  # pipeline order, not argument order
    assert names(select_stages(stages, "all")) == names(stages)
    assert group_of("dedup_buckets") == "dedup" and group_of("pack") == "tokenize"
    with pytest.raises(ValueError, match="unknown stage 'tokenise'.*tokenize"):
        select_stages(stages, "tokenise")


def test_stage_configs_change_only_their_own_digest():
    base = {s.name: s.config_digest() for s in build_stages(PrepConfig())}
    tuned = {s.name: s.config_digest() for s in build_stages(PrepConfig(filter={"c4": {"min_num_sentences": 2}}))}
    assert [n for n in base if base[n] != tuned[n]] == ["filter"]


def test_factories_are_import_paths():
    assert names(load_factory(FACTORY)(PrepConfig())) == ["upper", "words", "merge"]
    with pytest.raises(ValueError, match="module:function"):
        load_factory("tests.flows.toy_stages.build")
