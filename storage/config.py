"""Storage section of the pipeline config.

Credentials may come from here or from the standard AWS chain (env vars, ~/.aws, instance role);
they are held as ``SecretStr`` so that printing, logging or dumping the resolved config never shows
them.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = Field("./shardflow-data", description="Dataset root: a path, file://, s3://bucket/prefix or any fsspec URI.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, R2 …); None = AWS.")
    region: str | None = None
    key: SecretStr | None = Field(None, description="Access key id; None = standard AWS credential chain.")
    secret: SecretStr | None = Field(None, description="Secret access key; None = standard AWS credential chain.")
    anon: bool = False
    options: dict[str, Any] = Field(default_factory=dict, description="Extra fsspec filesystem options.")

    def fsspec_options(self, protocol: str) -> dict[str, Any]:
        """Options for ``fsspec.filesystem(protocol, **opts)``, secrets revealed only here."""
        opts: dict[str, Any] = dict(self.options)
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

    def secrets(self) -> list[str]:
        """Secret values, so that error messages can be scrubbed of them."""
        return [s.get_secret_value() for s in (self.key, self.secret) if s is not None and s.get_secret_value()]
