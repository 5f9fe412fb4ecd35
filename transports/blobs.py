"""The S3 claim-check: large job inputs and results live in a bucket and only a reference
(``s3://bucket/key``) travels on the bus or sits in the job row.

``BlobStore`` is the port (S3 on boto3, and an in-memory twin); ``ClaimCheck`` holds the
policy the API and the workers share: which bucket and prefix we write to, which buckets an
``input_url`` may name, the size thresholds and the presigned-URL lifetime.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from transports.base import TransportError

S3_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<key>.+)$")
REF = "$ref"  # a stored result {"$ref": "s3://..."} stands for the object it names
_MISSING = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
DEAD_LETTER_MAX_BYTES = 64 * 1024 * 1024  # far above any bus's message limit


class BlobError(TransportError):
    """An object could not be read or written."""


class BlobNotFound(BlobError):
    """The bucket or the key does not exist."""


class BlobTooLarge(BlobError):
    """The object is larger than the caller allows."""


def parse_s3_url(url: str) -> tuple[str, str]:
    match = S3_URL.match(url)
    if match is None:
        raise ValueError(f"not an s3://bucket/key URL: {url!r}")
    return match["bucket"], match["key"]


class BlobStore(Protocol):
    async def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None: ...

    async def get(self, bucket: str, key: str, max_bytes: int) -> bytes:
        """The object's bytes; BlobNotFound, or BlobTooLarge past ``max_bytes``."""
        ...

    async def presign(self, bucket: str, key: str, ttl_s: int) -> str: ...


@dataclass
class MemoryBlobs:
    """In-memory twin of S3: buckets must exist (``buckets``) like real ones."""

    buckets: dict[str, dict[str, bytes]] = field(default_factory=dict)

    async def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        if bucket not in self.buckets:
            raise BlobNotFound(f"bucket {bucket!r} does not exist")
        self.buckets[bucket][key] = data

    async def get(self, bucket: str, key: str, max_bytes: int) -> bytes:
        data = self.buckets.get(bucket, {}).get(key)
        if data is None:
            raise BlobNotFound(f"s3://{bucket}/{key} does not exist")
        if len(data) > max_bytes:
            raise BlobTooLarge(f"s3://{bucket}/{key} is {len(data)} bytes, over {max_bytes}")
        return data

    async def presign(self, bucket: str, key: str, ttl_s: int) -> str:
        return f"memory://{bucket}/{key}?ttl={ttl_s}"


class S3Blobs:
    """BlobStore on boto3's S3 client, run off the event loop."""

    def __init__(self, endpoint_url: str | None = None, region: str | None = None) -> None:
        self.endpoint_url = endpoint_url
        self._s3: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=BotoConfig(retries={"mode": "standard", "max_attempts": 3}),
        )

    def close(self) -> None:
        self._s3.close()

    async def create_bucket(self, bucket: str) -> None:
        """Create ``bucket`` where missing (dev's local endpoint)."""
        try:
            await asyncio.to_thread(self._s3.create_bucket, Bucket=bucket)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise BlobError(f"cannot create bucket {bucket!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise BlobError(f"cannot create bucket {bucket!r}: {exc}") from exc

    async def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        try:
            await asyncio.to_thread(
                self._s3.put_object, Bucket=bucket, Key=key, Body=data, ContentType=content_type
            )
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise BlobNotFound(f"bucket {bucket!r} does not exist") from exc
            raise BlobError(f"cannot write s3://{bucket}/{key}: {exc}") from exc
        except BotoCoreError as exc:
            raise BlobError(f"cannot write s3://{bucket}/{key}: {exc}") from exc

    async def get(self, bucket: str, key: str, max_bytes: int) -> bytes:
        return await asyncio.to_thread(self._get, bucket, key, max_bytes)

    def _get(self, bucket: str, key: str, max_bytes: int) -> bytes:
        try:
            response = self._s3.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise BlobNotFound(f"s3://{bucket}/{key} does not exist") from exc
            raise BlobError(f"cannot read s3://{bucket}/{key}: {exc}") from exc
        except BotoCoreError as exc:
            raise BlobError(f"cannot read s3://{bucket}/{key}: {exc}") from exc
        body = response["Body"]
        try:
            size = int(response.get("ContentLength", 0))
            if size > max_bytes:
                raise BlobTooLarge(f"s3://{bucket}/{key} is {size} bytes, over {max_bytes}")
            data: bytes = body.read(max_bytes + 1)  # never trust the header alone
            if len(data) > max_bytes:
                raise BlobTooLarge(f"s3://{bucket}/{key} is over {max_bytes} bytes")
            return data
        finally:
            body.close()

    async def presign(self, bucket: str, key: str, ttl_s: int) -> str:
        url: str = await asyncio.to_thread(
            self._s3.generate_presigned_url,
            "get_object",
            Params={"Bucket": bucket, "Key": key},
            ExpiresIn=ttl_s,
        )
        return url


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@dataclass(frozen=True)
class ClaimCheck:
    """The claim-check policy, shared by the API (offload inputs, presign results) and the
    workers (resolve inputs, offload results)."""

    blobs: BlobStore
    bucket: str | None  # where we write; None: nothing is offloaded
    prefix: str = "inferq/"
    allowed_buckets: frozenset[str] = frozenset()
    inline_input_max_bytes: int = 64 * 1024
    inline_result_max_bytes: int = 64 * 1024
    input_url_max_bytes: int = 8 * 1024 * 1024
    presign_ttl_s: int = 3600

    def allows(self, url: str) -> bool:
        try:
            bucket, _ = parse_s3_url(url)
        except ValueError:
            return False
        return bucket in self.allowed_buckets or bucket == self.bucket

    def _url(self, kind: str, job_id: str) -> tuple[str, str]:
        assert self.bucket is not None
        return self.bucket, f"{self.prefix}{kind}/{job_id}.json"

    async def offload_input(self, job_id: str, payload: dict[str, Any]) -> str | None:
        """Write an input over the inline limit to S3; its URL, or None to keep it inline."""
        data = _dumps(payload)
        if self.bucket is None or len(data) <= self.inline_input_max_bytes:
            return None
        bucket, key = self._url("inputs", job_id)
        await self.blobs.put(bucket, key, data, "application/json")
        return f"s3://{bucket}/{key}"

    async def load_input(self, url: str) -> dict[str, Any]:
        """The JSON object at an allowed ``input_url``; BlobError subclasses or ValueError."""
        bucket, key = parse_s3_url(url)
        data = await self.blobs.get(bucket, key, self.input_url_max_bytes)
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError(f"{url} holds JSON that is not an object")
        return doc

    async def offload_result(self, job_id: str, result: dict[str, Any]) -> dict[str, Any]:
        """A result over the inline limit is written to S3 and replaced by ``{"$ref": url}``."""
        data = _dumps(result)
        if self.bucket is None or len(data) <= self.inline_result_max_bytes:
            return result
        bucket, key = self._url("results", job_id)
        await self.blobs.put(bucket, key, data, "application/json")
        return {REF: f"s3://{bucket}/{key}"}

    async def offload_dead_letter(self, name: str, data: bytes) -> str | None:
        """Keep the whole payload of a dead letter too large for its destination; its URL,
        or None when there is no bucket to write to."""
        if self.bucket is None:
            return None
        bucket, key = self.bucket, f"{self.prefix}dead-letters/{name}.bin"
        await self.blobs.put(bucket, key, data, "application/octet-stream")
        return f"s3://{bucket}/{key}"

    async def load_dead_letter(self, url: str) -> bytes:
        """The payload ``offload_dead_letter`` wrote (for a redrive)."""
        bucket, key = parse_s3_url(url)
        return await self.blobs.get(bucket, key, DEAD_LETTER_MAX_BYTES)

    async def result_url(self, result: dict[str, Any] | None) -> str | None:
        """A presigned GET URL for an offloaded result, else None."""
        if not result or set(result) != {REF}:
            return None
        bucket, key = parse_s3_url(str(result[REF]))
        return await self.blobs.presign(bucket, key, self.presign_ttl_s)


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()
