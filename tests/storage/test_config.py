"""The storage section's secret handling and the one ``--set`` parser every entry point uses."""
from __future__ import annotations

import json
import pickle

import pytest
from pydantic import SecretStr

from shardflow.storage import StorageConfig
from shardflow.storage.config import MASK, OverrideError, apply_override, is_secret_key, mask_secrets


@pytest.mark.parametrize("name", ["key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                                  "aws_session_token", "api-key", "client_secret", "sessionToken", "AccessKey",
                                  "account_key", "connection_string", "sas_token", "credentials"])
def test_secret_like_keys(name):
    assert is_secret_key(name)


@pytest.mark.parametrize("name", ["endpoint_url", "client_kwargs", "config_kwargs", "region_name", "retries",
                                  "max_attempts", "tokenizer", "keys", "key_prefix", "anon", "use_ssl", "mode"])
def test_ordinary_keys(name):
    assert not is_secret_key(name)


def test_options_are_masked_in_every_dump_and_revealed_only_to_fsspec():
    cfg = StorageConfig(root="s3://b/r", key="AKIAXYZ", secret="sekrit",
                        options={"token": "t0k3n", "client_kwargs": {"aws_session_token": "s3ss10n"},
                                 "config_kwargs": {"retries": {"max_attempts": 10}}})
    dumped = cfg.model_dump(mode="json")
    assert dumped["options"] == {"token": MASK, "client_kwargs": {"aws_session_token": MASK},
                                 "config_kwargs": {"retries": {"max_attempts": 10}}}
    for text in (json.dumps(dumped), cfg.model_dump_json(), repr(cfg), str(cfg), str(cfg.model_dump())):
        for secret in ("AKIAXYZ", "sekrit", "t0k3n", "s3ss10n"):
            assert secret not in text, (secret, text)
    # Python-mode dumps (Prefect flow parameters) keep SecretStr, which pickles with the value.
    assert isinstance(cfg.model_dump()["options"]["token"], SecretStr)
    again = pickle.loads(pickle.dumps(StorageConfig.model_validate(cfg.model_dump())))
    opts = again.fsspec_options("s3")
    assert opts["token"] == "t0k3n" and opts["client_kwargs"]["aws_session_token"] == "s3ss10n"
    assert opts["key"] == "AKIAXYZ" and opts["secret"] == "sekrit" and opts["config_kwargs"]["retries"]["max_attempts"] == 10
    assert sorted(cfg.secrets()) == sorted(["AKIAXYZ", "sekrit", "t0k3n", "s3ss10n"])
    assert cfg.secret_fields()["options"]["token"] == "t0k3n"


def test_mask_secrets_anywhere():
    data = {"prep": {"api_key": "k", "tokenizer": {"vocab_size": 5}}, "x": [{"password": "p"}], "token": None,
            "s": SecretStr("v")}
    assert mask_secrets(data) == {"prep": {"api_key": MASK, "tokenizer": {"vocab_size": 5}}, "x": [{"password": MASK}],
                                  "token": None, "s": MASK}


def test_apply_override_parses_yaml_creates_sections_and_refuses_bad_input():
    data = {"train": {"optim": {"lr": 1.0}}, "flat": 3}
    apply_override(data, "train.optim.lr=0.5")
    apply_override(data, "train.trainer.steps=7")
    apply_override(data, "prep.inputs=['a/*.jsonl', b]")
    apply_override(data, "storage.root=s3://bucket/x=y")  # only the first '=' splits
    assert data["train"] == {"optim": {"lr": 0.5}, "trainer": {"steps": 7}}
    assert data["prep"]["inputs"] == ["a/*.jsonl", "b"] and data["storage"]["root"] == "s3://bucket/x=y"
    with pytest.raises(OverrideError, match="not of the form section.key=value"):
        apply_override(data, "train.optim.lr")
    with pytest.raises(OverrideError, match="empty key"):
        apply_override(data, "=3")
    with pytest.raises(OverrideError, match="flat is not a section"):
        apply_override(data, "flat.x=1")
