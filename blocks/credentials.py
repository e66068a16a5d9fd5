"""OCI credentials as a Prefect block, and the one way to get an SDK client from them."""

from __future__ import annotations

import os
from typing import Any, Literal

import oci
from prefect.blocks.core import Block
from pydantic import Field, SecretStr, model_validator

from diskimport import cloud

SERVICES = {
    "compute": oci.core.ComputeClient,
    "blockstorage": oci.core.BlockstorageClient,
    "network": oci.core.VirtualNetworkClient,
    "object_storage": oci.object_storage.ObjectStorageClient,
    "identity": oci.identity.IdentityClient,
}


class OCICredentials(Block):
    """Credentials for Oracle Cloud Infrastructure: an API signing key, a config file
    profile, an instance principal or a resource principal.

    Example:
        ```python
        from blocks import OCICredentials

        credentials = OCICredentials.load("BLOCK_NAME")
        compute = credentials.get_client("compute")
        clients = credentials.clients()  # every client an import uses
        ```
    """

    _block_type_name = "OCI Credentials"
    _block_type_slug = "oci-credentials"
    _logo_url = "https://www.oracle.com/a/ocom/img/cloud-infrastructure.svg"
    _description = "Credentials for Oracle Cloud Infrastructure (API key, config file, instance or resource principal)."

    auth_type: Literal["api_key", "config_file", "instance_principal", "resource_principal"] = Field(
        default="config_file", description="How to authenticate: API signing key fields below, an OCI config file "
        "profile, the instance principal of the host, or the resource principal of a function.")
    tenancy_ocid: str | None = Field(default=None, description="Tenancy OCID (api_key).")
    user_ocid: str | None = Field(default=None, description="User OCID (api_key).")
    fingerprint: str | None = Field(default=None, description="Fingerprint of the API signing key (api_key).")
    region: str | None = Field(default=None, description="Region identifier, e.g. eu-frankfurt-1 (api_key; "
                               "overrides the config file's region).")
    private_key: SecretStr | None = Field(default=None, description="PEM private API signing key (api_key).")
    pass_phrase: SecretStr | None = Field(default=None, description="Pass phrase of the private key, if any.")
    config_file: str = Field(default="~/.oci/config", description="OCI config file (config_file).")
    profile: str = Field(default="DEFAULT", description="Profile in the config file (config_file).")
    endpoint: str | None = Field(default=None, description="Send every service's calls to this endpoint instead "
                                 "of the region's (the local OCI of the local stack).")
    region_endpoints: dict[str, str] = Field(default_factory=dict, description="Endpoints of other regions, by "
                                             "region identifier (copy-to-region's destinations on a local OCI or "
                                             "a private endpoint); a region not listed uses the SDK's own.")

    @model_validator(mode="after")
    def _complete(self) -> "OCICredentials":
        if self.auth_type == "api_key":
            missing = [f for f in ("tenancy_ocid", "user_ocid", "fingerprint", "region", "private_key")
                       if getattr(self, f) in (None, "")]
            if missing:
                raise ValueError(f"auth_type api_key needs {', '.join(missing)}")
        return self

    def sdk_config(self) -> tuple[dict[str, Any], Any]:
        """The SDK ``config`` dict and ``signer`` (None for key-based auth) for these credentials."""
        if self.auth_type == "config_file":
            config = oci.config.from_file(os.path.expanduser(self.config_file), self.profile)
            if self.region:
                config["region"] = self.region
            return config, None
        if self.auth_type == "api_key":
            config = {
                "tenancy": self.tenancy_ocid, "user": self.user_ocid, "fingerprint": self.fingerprint,
                "region": self.region, "key_content": self.private_key.get_secret_value(),
            }
            if self.pass_phrase is not None:
                config["pass_phrase"] = self.pass_phrase.get_secret_value()
            oci.config.validate_config(config)
            return config, None
        if self.auth_type == "instance_principal":
            signer = oci.auth.signers.InstancePrincipalsSecurityTokenSigner()
        else:
            signer = oci.auth.signers.get_resource_principals_signer()
        return {"region": self.region or signer.region}, signer

    def signed_config(self) -> tuple[dict[str, Any], Any]:
        """``sdk_config()`` with the signer made once: an API key's signer, which the SDK would
        otherwise build for every client, reading and checking the private key each time (tens of
        milliseconds of CPU apiece). A config with an ``authentication_type`` (session tokens)
        keeps the SDK's own choice of signer."""
        config, signer = self.sdk_config()
        if signer is None and oci.util.AUTHENTICATION_TYPE_FIELD_NAME not in config:
            signer = oci.signer.Signer(
                tenancy=config["tenancy"], user=config["user"], fingerprint=config["fingerprint"],
                private_key_file_location=config.get("key_file"), pass_phrase=config.get("pass_phrase"),
                private_key_content=config.get("key_content"))
        return config, signer

    def get_client(self, service: str, region: str | None = None, *, signed: tuple[dict[str, Any], Any] | None = None,
                   **kwargs: Any) -> Any:
        """A ready SDK client for ``service`` (compute, blockstorage, network, object_storage, identity),
        in ``region`` (default: the credentials' own); ``signed``: a ``signed_config()`` to reuse."""
        try:
            client_class = SERVICES[service]
        except KeyError:
            raise ValueError(f"unknown OCI service {service!r}; expected one of {', '.join(SERVICES)}") from None
        config, signer = signed or self.signed_config()
        if signer is not None:
            kwargs["signer"] = signer
        home = config.get("region")
        if region and region != home:
            config = {**config, "region": region}
            if region in self.region_endpoints:
                kwargs.setdefault("service_endpoint", self.region_endpoints[region])
        elif self.endpoint:
            kwargs.setdefault("service_endpoint", self.endpoint)
        return client_class(config, **kwargs)

    def home_region(self) -> str | None:
        return self.sdk_config()[0].get("region")

    def clients(self, region: str | None = None) -> cloud.Clients:
        """The SDK clients an import uses, all from these credentials (in ``region``, default their own)."""
        signed = self.signed_config()
        return cloud.Clients(**{service: self.get_client(service, region, signed=signed) for service in
                                ("compute", "blockstorage", "network", "object_storage", "identity")})
