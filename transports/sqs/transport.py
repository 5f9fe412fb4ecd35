"""The SQS transport: one object that builds every part of an SQS bus from its config."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from schemas.envelope import JobEnvelope
from transports.blobs import S3Blobs
from transports.sqs.asyncapi import sqs_asyncapi_document
from transports.sqs.client import SqsConfig
from transports.sqs.consumer import SqsConsumer
from transports.sqs.depth import SqsDepth
from transports.sqs.local import LocalAws
from transports.sqs.publisher import SqsPublisher
from transports.sqs.queues import check_queues, dlq_name, ensure_queues
from transports.sqs.sns import SnsPublisher, ensure_topic, events_topic_name
from transports.transport import Capabilities, Encoded, LocalServerSpec, encode_event

LOCAL = LocalServerSpec(what="the local SQS/S3 endpoint", port=15000, option="--aws-port")


@dataclass(frozen=True)
class SqsTransport:
    """A jobs queue and its ``<queue>-dlq``, joined by a RedrivePolicy.

    ``create_queues``: create them on start where missing (else only check they exist);
    ``bucket``: the claim-check bucket, created by ``prepare`` only on dev's local endpoint.
    """

    client: SqsConfig
    queue: str = "inferq-jobs"
    create_queues: bool = True
    bucket: str | None = None
    create_bucket: bool = False

    name = "sqs"
    local = LOCAL

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            redelivers_itself=True,  # nack: the visibility timeout brings it back
            ordered_partitions=False,
            consumer_groups=False,
            contiguous_commits=False,
            structured_events=True,
            fetch_timeout_s=self.client.wait_time_s,  # long polls
            # a final attempt before the redrive policy would take the message
            max_deliveries=self.client.max_receive_count,
        )

    @property
    def jobs(self) -> str:
        return self.queue

    @property
    def dead_letters(self) -> str:
        return dlq_name(self.queue)

    @property
    def events(self) -> str:
        return events_topic_name(self.queue)

    def events_publisher(self, client_id: str) -> SnsPublisher:
        return SnsPublisher(self.client)

    @property
    def address(self) -> str | None:
        return self.client.endpoint_url or None

    @property
    def missing(self) -> str | None:
        return None  # no endpoint: boto3's own default (AWS)

    def publisher(self, client_id: str) -> SqsPublisher:
        return SqsPublisher(self.client)

    def consumer(
        self,
        client_id: str,
        *,
        member: str | None = None,
        source: str | None = None,
        group: str | None = None,
    ) -> SqsConsumer:
        return SqsConsumer(self.client, source or self.queue, group)

    def depth(
        self, client_id: str, *, source: str | None = None, group: str | None = None
    ) -> SqsDepth:
        return SqsDepth(self.client, source or self.queue, group)

    async def prepare(self, *, create: bool | None = None) -> None:
        if not (self.create_queues if create is None else create):
            await check_queues(self.client, [self.queue, self.dead_letters])
            return
        await ensure_queues(self.client, self.queue)
        await ensure_topic(self.client, self.events)
        if self.create_bucket and self.bucket:
            blobs = S3Blobs(endpoint_url=self.client.endpoint_url)
            try:
                await blobs.create_bucket(self.bucket)
            finally:
                blobs.close()

    async def prepare_publisher(self) -> None:
        await self.prepare()  # a missing queue would fail every publish

    def encode(self, envelope: JobEnvelope) -> Encoded:
        return encode_event(envelope, structured=self.capabilities.structured_events)

    def asyncapi(self) -> dict[str, Any]:
        return sqs_asyncapi_document(
            self.queue, self.dead_letters, self.client.endpoint_url, events=self.events
        )

    def local_server(self, data_dir: Path, port: int) -> LocalAws:
        return LocalAws(data_dir / "aws", port)

    def on_local_server(self, address: str) -> SqsTransport:
        return replace(self, client=replace(self.client, endpoint_url=address), create_bucket=True)

    def environment(self) -> dict[str, str]:
        env = {"INFERQ_TRANSPORT": self.name}
        if self.client.endpoint_url:
            env["AWS_ENDPOINT_URL"] = self.client.endpoint_url
        return env

    def describe(self, where: str) -> str:
        endpoint = self.client.endpoint_url or "AWS"
        return f"SQS        {endpoint} ({where})   queues {self.queue}, {self.dead_letters}"
