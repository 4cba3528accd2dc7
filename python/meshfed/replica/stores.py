"""Where a replica lives: Kubernetes Secrets, or keys of Consul's KV store.

Both keep the manifest under one name and each piece under a name made of its
digest, and both write the manifest as a compare-and-swap on the version last
read — the Secret's ``resourceVersion``, the key's ``ModifyIndex`` — so of two
writers working from one version the server keeps one. That check is the
fence: a process that lost its leadership without noticing cannot overwrite
its successor's publications.

Kubernetes: the manifest is Secret ``NAME``, each piece Secret
``NAME-<digest>``, all labelled ``meshfed.io/state-replica=NAME`` (Secrets,
not ConfigMaps: they hold the CA's keys and the API tokens); the identity
needs get/list/create/update/delete on Secrets in the namespace. Consul: keys
``PREFIX/manifest`` and ``PREFIX/pieces/<digest>``; the token needs
``key_prefix "PREFIX/" write`` (``helm/meshfed/examples/consul-acl-policy.hcl``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from meshfed.errors import MeshfedError
from meshfed.replica import KvReplica, SecretReplica
from meshfed.replica.manifest import ReplicaError

if TYPE_CHECKING:  # the platform clients load only for a zone that replicates
    from meshfed.catalog.consul_api import ConsulApi
    from meshfed.catalog.kubernetes_api import Document, KubernetesApi

REPLICA_LABEL = "meshfed.io/state-replica"
_MAX_LISTED = 10_000  # pieces a listing may name: more than any manifest holds


class ReplicaStore(Protocol):
    """The operations a replica needs of its platform."""

    @property
    def where(self) -> str: ...  # for messages: "Secret default/meshfed-east-state"

    @property
    def largest(self) -> int: ...  # bytes one object (manifest or piece) may hold

    def sibling(
        self, suffix: str
    ) -> ReplicaStore: ...  # a store of the same kind beside it: NAME-<suffix>, PREFIX/<suffix>

    async def read_manifest(self) -> tuple[bytes, str] | None:
        """The stored manifest and its version; None if there is none."""

    async def write_manifest(self, data: bytes, version: str | None) -> str | None:
        """Store ``data`` if the manifest is still at ``version`` (None: if there is none); the new version,
        or None if another writer came first."""

    async def read_piece(self, digest: str) -> bytes | None:
        """A piece as stored; None if it is not there."""

    async def write_piece(self, digest: str, data: bytes) -> None:
        """Store a piece (one already there holds the same bytes: its name is their digest)."""

    async def delete_piece(self, digest: str) -> None:
        """Delete a piece; one already gone is no error."""

    async def pieces(self) -> set[str]:
        """The digests of every stored piece."""


class SecretStore:
    """A replica in Secrets of one namespace."""

    largest = 1_000_000  # a Secret's data is at most 1 MiB, with room for its keys

    def __init__(self, api: KubernetesApi, namespace: str, name: str) -> None:
        self._api, self.namespace, self.name = api, namespace, name

    @property
    def where(self) -> str:
        return f"Secret {self.namespace}/{self.name}"

    def sibling(self, suffix: str) -> SecretStore:
        return SecretStore(self._api, self.namespace, f"{self.name}-{suffix}")

    async def read_manifest(self) -> tuple[bytes, str] | None:
        secret = await self._read(self.name)
        if secret is None:
            return None
        return self._data(secret, "manifest"), str(secret.get("metadata", {}).get("resourceVersion", ""))

    async def write_manifest(self, data: bytes, version: str | None) -> str | None:
        from meshfed.catalog.kubernetes_api import NotFoundError

        body = self._secret(self.name, "manifest", data)
        try:
            with self._described():
                if version is None:
                    written = await self._api.request(self._api.create_call("secrets", self.namespace, body))
                else:
                    body["metadata"]["resourceVersion"] = version
                    call = self._api.replace_call("secrets", self.namespace, self.name, body)
                    written = await self._api.request(call)
        except (_ConflictError, NotFoundError):  # another writer's version, or it deleted the manifest
            return None
        return str(written.get("metadata", {}).get("resourceVersion", ""))

    async def read_piece(self, digest: str) -> bytes | None:
        secret = await self._read(self._piece_name(digest))
        return None if secret is None else self._data(secret, "piece")

    async def write_piece(self, digest: str, data: bytes) -> None:
        body = self._secret(self._piece_name(digest), "piece", data)
        with contextlib.suppress(_ConflictError), self._described():  # already there: the same bytes
            await self._api.request(self._api.create_call("secrets", self.namespace, body))

    async def delete_piece(self, digest: str) -> None:
        from meshfed.catalog.kubernetes_api import NotFoundError

        with contextlib.suppress(NotFoundError), self._described():
            await self._api.request(self._api.delete_call("secrets", self.namespace, self._piece_name(digest)))

    async def pieces(self) -> set[str]:
        prefix = f"{self.name}-"
        with self._described():
            listed = await self._api.request(
                self._api.list_call("secrets", self.namespace, label_selector=f"{REPLICA_LABEL}={self.name}")
            )
        names = [str(item.get("metadata", {}).get("name", "")) for item in listed.get("items") or []][:_MAX_LISTED]
        return {name.removeprefix(prefix) for name in names if name.startswith(prefix)}

    def _piece_name(self, digest: str) -> str:
        return f"{self.name}-{digest}"

    def _secret(self, name: str, key: str, data: bytes) -> Document:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "labels": {REPLICA_LABEL: self.name, "app.kubernetes.io/managed-by": "meshfed"},
            },
            "data": {key: base64.b64encode(data).decode()},
        }

    def _data(self, secret: Document, key: str) -> bytes:
        name = secret.get("metadata", {}).get("name", "?")
        value = (secret.get("data") or {}).get(key)
        if not isinstance(value, str):
            raise ReplicaError(f"Secret {self.namespace}/{name} has no data key {key!r}: it is not a meshfed replica")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ReplicaError(f"Secret {self.namespace}/{name}: data {key!r} is not base64") from None

    async def _read(self, name: str) -> Document | None:
        from meshfed.catalog.kubernetes_api import NotFoundError

        try:
            with self._described():
                return await self._api.request(self._api.read_call("secrets", self.namespace, name))
        except NotFoundError as err:
            if 'namespaces "' in err.message:
                raise ReplicaError(f"{self.where}: {self._api.describe(err)}") from None
            return None

    @contextlib.contextmanager
    def _described(self) -> Iterator[None]:
        """The API's errors as one line naming the replica; a 409 as :class:`_ConflictError`, a 404 as it is."""
        from meshfed.catalog.kubernetes_api import ApiError, NotFoundError

        try:
            yield
        except NotFoundError:
            raise
        except ApiError as err:
            if err.status == 409:
                raise _ConflictError from None
            raise ReplicaError(f"{self.where}: {self._api.describe(err)}") from None
        except MeshfedError:
            raise
        except Exception as err:
            raise ReplicaError(f"{self.where}: {self._api.describe(err)}") from None


class _ConflictError(Exception):
    """The server kept another writer's version (HTTP 409)."""


class KvStore:
    """A replica under one prefix of Consul's KV store."""

    largest = 512 * 1024  # Consul's default kv_max_value_size

    def __init__(self, api: ConsulApi, prefix: str) -> None:
        self._api, self.prefix = api, prefix.rstrip("/")

    @property
    def where(self) -> str:
        return f"Consul KV {self.prefix}/"

    def sibling(self, suffix: str) -> KvStore:
        return KvStore(self._api, f"{self.prefix}/{suffix}")

    async def read_manifest(self) -> tuple[bytes, str] | None:
        entry = await self._entry(f"{self.prefix}/manifest")
        return None if entry is None else (entry[0], str(entry[1]))

    async def write_manifest(self, data: bytes, version: str | None) -> str | None:
        # cas=0 writes only a key that does not exist; cas=N only a key still at ModifyIndex N.
        with self._api.described(self.where, ReplicaError, key_prefix=self.prefix):
            written = await self._api.send(f"/v1/kv/{self.prefix}/manifest", params={"cas": version or "0"}, body=data)
        if written is not True:
            return None
        entry = await self._entry(f"{self.prefix}/manifest")
        return None if entry is None or entry[0] != data else str(entry[1])

    async def read_piece(self, digest: str) -> bytes | None:
        entry = await self._entry(f"{self.prefix}/pieces/{digest}")
        return None if entry is None else entry[0]

    async def write_piece(self, digest: str, data: bytes) -> None:
        with self._api.described(self.where, ReplicaError, key_prefix=self.prefix):
            await self._api.send(f"/v1/kv/{self.prefix}/pieces/{digest}", body=data)

    async def delete_piece(self, digest: str) -> None:
        with self._api.described(self.where, ReplicaError, key_prefix=self.prefix):
            await self._api.delete(f"/v1/kv/{self.prefix}/pieces/{digest}")

    async def pieces(self) -> set[str]:
        with self._api.described(self.where, ReplicaError, key_prefix=self.prefix):
            answer = await self._api.get(f"/v1/kv/{self.prefix}/pieces/", params={"keys": ""})
        keys = answer.body if isinstance(answer.body, list) else []
        start = f"{self.prefix}/pieces/"
        return {key.removeprefix(start) for key in keys[:_MAX_LISTED] if isinstance(key, str) and key.startswith(start)}

    async def _entry(self, key: str) -> tuple[bytes, int] | None:
        with self._api.described(self.where, ReplicaError, key_prefix=self.prefix):
            answer = await self._api.get(f"/v1/kv/{key}")
        entries = answer.body if isinstance(answer.body, list) else []
        if not entries:
            return None
        entry: Any = entries[0]
        if not isinstance(entry, dict) or not isinstance(entry.get("ModifyIndex"), int):
            raise ReplicaError(f"{self.where}: Consul answered {key} with {str(entry)[:100]!r}, not a KV entry")
        try:
            value = base64.b64decode(str(entry.get("Value") or ""), validate=True)
        except (binascii.Error, ValueError):
            raise ReplicaError(f"{self.where}: Consul answered {key} with a value that is not base64") from None
        return value, entry["ModifyIndex"]


def replica_store(replica: SecretReplica | KvReplica, client: KubernetesApi | ConsulApi) -> ReplicaStore:
    """Where ``replica`` is kept, over ``client`` (a Kubernetes client for Secrets, a Consul one for KV)."""
    from meshfed.catalog.consul_api import ConsulApi
    from meshfed.catalog.kubernetes_api import KubernetesApi

    if isinstance(replica, SecretReplica):
        assert isinstance(client, KubernetesApi)
        return SecretStore(client, replica.namespace, replica.name)
    assert isinstance(client, ConsulApi)
    return KvStore(client, replica.prefix)


def feed_store(replica: SecretReplica | KvReplica, client: KubernetesApi | ConsulApi) -> ReplicaStore:
    """Where the gateway feed beside ``replica`` starts (:mod:`meshfed.replica.gateway_feed`): the manifest object
    of Secret ``NAME-gateway``, or of keys under ``PREFIX/gateway/``; its further parts are that store's siblings."""
    return replica_store(replica, client).sibling(FEED_SUFFIX)


# The suffix of the gateway feed's store name; in a Secret's name it cannot be a piece's (64 hex digits).
FEED_SUFFIX = "gateway"

__all__ = ["FEED_SUFFIX", "REPLICA_LABEL", "KvStore", "ReplicaStore", "SecretStore", "feed_store", "replica_store"]
