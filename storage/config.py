"""Storage section of the pipeline config, and the config helpers every entry point shares.

Credentials may come from here or from the standard AWS chain (env vars, ~/.aws, instance role);
they are held as ``SecretStr``, and ``options`` values under secret-like keys are masked when the
config is dumped, so that printing, logging, digesting or writing the resolved config never shows
them. ``--set`` overrides are parsed here once (:func:`apply_override`) because both the pipeline
CLI (flows) and ``python -m shardflow.train`` accept them and ``train`` must not import ``flows``.
"""
from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer, field_validator

MASK = "**********"
"""What a secret value is replaced by in every dump (the same as pydantic's ``SecretStr``)."""

_SECRET_KEY = re.compile(r"(^|[_\-.])(key|secret|token|password|passwd|pwd|credentials?|session|signature|sas|"
                         r"auth|authorization|private|cookie|connection_string|account_key|api_key)s?($|[_\-.])",
                         re.IGNORECASE)
_NOT_SECRET = frozenset({"key_prefix", "keys", "sse_kms_key_id_alias"})


def is_secret_key(name: str) -> bool:
    """A mapping key whose value must never be written out (``secret``, ``aws_session_token``, ``api-key`` …)."""
    name = str(name)
    return name.lower() not in _NOT_SECRET and bool(_SECRET_KEY.search(name.replace("Key", "_key").replace("Token", "_token")))


def mask_secrets(obj: Any) -> Any:
    """``obj`` with the value of every secret-like key (at any depth), and every ``SecretStr``,
    replaced by :data:`MASK`."""
    if isinstance(obj, dict):
        return {k: (MASK if obj[k] is not None and is_secret_key(k) and not isinstance(obj[k], (dict, bool))
                    else mask_secrets(obj[k])) for k in obj}
    if isinstance(obj, (list, tuple)):
        return [mask_secrets(v) for v in obj]
    return MASK if isinstance(obj, SecretStr) else obj


def _hide(obj: Any, under_secret: bool = False) -> Any:
    """Values under secret-like keys wrapped in ``SecretStr`` (so that even a Python-mode dump, e.g.
    a Prefect flow parameter, shows them masked while pickling keeps them)."""
    if isinstance(obj, dict):
        return {k: _hide(v, under_secret or is_secret_key(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_hide(v, under_secret) for v in obj]
    if under_secret and isinstance(obj, str):
        return SecretStr(obj)
    return obj


def reveal(obj: Any) -> Any:
    """The inverse of the masking wrappers: ``SecretStr`` values (at any depth) in clear."""
    if isinstance(obj, dict):
        return {k: reveal(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [reveal(v) for v in obj]
    return obj.get_secret_value() if isinstance(obj, SecretStr) else obj


class OverrideError(ValueError):
    """A ``--set`` assignment is malformed; the message says why (callers prefix their source)."""


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set dotted.key=value`` to nested config data; the value is parsed as YAML."""
    if "=" not in assignment:
        raise OverrideError(f"override {assignment!r} is not of the form section.key=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise OverrideError(f"override {assignment!r} has an empty key")
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise OverrideError(f"{'.'.join(parts[: i + 1])} is not a section, cannot set {key.strip()}")
        node = nxt
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node[parts[-1]] = value


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = Field("./shardflow-data", description="Dataset root: a path, file://, s3://bucket/prefix or any fsspec URI.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, R2 …); None = AWS.")
    region: str | None = None
    key: SecretStr | None = Field(None, description="Access key id; None = standard AWS credential chain.")
    secret: SecretStr | None = Field(None, description="Secret access key; None = standard AWS credential chain.")
    anon: bool = False
    options: dict[str, Any] = Field(default_factory=dict, description="Extra fsspec filesystem options "
                                    "(values under secret-like keys are masked in every dump).")

    @field_validator("options", mode="after")
    @classmethod
    def _hide_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        return _hide(options)

    @field_serializer("options", when_used="json")
    def _masked_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return mask_secrets(options)

    def fsspec_options(self, protocol: str) -> dict[str, Any]:
        """Options for ``fsspec.filesystem(protocol, **opts)``, secrets revealed only here."""
        opts: dict[str, Any] = reveal(self.options)
        if protocol in ("s3", "s3a"):
            if self.endpoint_url:
                opts.setdefault("endpoint_url", self.endpoint_url)
            if self.region:
                opts.setdefault("client_kwargs", {}).setdefault("region_name", self.region)
            if self.key is not None:
                opts["key"] = self.key.get_secret_value()
            if self.secret is not None:
                opts["secret"] = self.secret.get_secret_value()
            if self.anon:
                opts["anon"] = True
        return opts

    def secret_fields(self) -> dict[str, Any]:
        """``key``, ``secret`` and ``options`` in clear: what a launcher hands its ranks through the
        environment (never a file), see ``shardflow.train.launch``."""
        return {"key": self.key.get_secret_value() if self.key is not None else None,
                "secret": self.secret.get_secret_value() if self.secret is not None else None,
                "options": reveal(self.options)}

    def secrets(self) -> list[str]:
        """Secret values, so that error messages can be scrubbed of them."""
        out = [s.get_secret_value() for s in (self.key, self.secret) if s is not None and s.get_secret_value()]
        out += [v for v in _secret_values(self.options) if v not in out]
        return out


def _secret_values(obj: Any, under_secret: bool = False) -> list[str]:
    if isinstance(obj, SecretStr):
        return [obj.get_secret_value()] if obj.get_secret_value() else []
    if isinstance(obj, dict):
        return [v for k, x in obj.items() for v in _secret_values(x, under_secret or is_secret_key(k))]
    if isinstance(obj, (list, tuple)):
        return [v for x in obj for v in _secret_values(x, under_secret)]
    return [str(obj)] if under_secret and isinstance(obj, (str, int)) and not isinstance(obj, bool) and str(obj) else []
